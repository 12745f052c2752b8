"""Options dataclasses <-> command lines, shared by the lab's experiments (demo, frontier).

Each field of an options dataclass is a ``--flag`` whose help text is ``field.metadata["help"]``;
booleans get ``--flag/--no-flag``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field
from typing import Any

from preftune.cli_args import OneLineParser

__all__ = ["build_options_parser", "command_line", "opt"]


def opt(default: Any, help_text: str):
    """A dataclass field with a default and its ``--flag`` help text."""
    return field(default=default, metadata={"help": help_text})


def build_options_parser(cls: type, prog: str, description: str,
                         short: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``cls`` (defaults shown in ``--help``)."""
    parser = OneLineParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = cls()
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}", *([short[f.name]] if short and f.name in short else [])]
        default = getattr(defaults, f.name)
        kwargs = {"default": default, "help": f.metadata["help"]}
        if isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*flags, type=type(default), **kwargs)
    return parser


def command_line(prog: str, options: Any) -> str:
    """The command that reproduces ``options``: ``prog`` plus the flags that differ from the defaults."""
    defaults, parts = type(options)(), [prog]
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value != getattr(defaults, f.name):
            if isinstance(value, bool):
                parts.append(f"--{'' if value else 'no-'}{f.name}")
            else:
                parts.append(f"--{f.name} {value}")
    return " ".join(parts)
