"""Pieces every benchmark script shares: package versions and the machine's CPU and memory."""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "pyarrow", "preftune")


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python's and each package's installed version ("not installed" where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name (lscpu), else what ``platform`` knows."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def hh_rows(hh_file: Path) -> Iterator[tuple[dict[str, str], tuple[str, str, str] | None]]:
    """Each Anthropic HH row and its (prompt, chosen, rejected) split at the shared prompt; None where
    a reply is empty or both are equal (no preference to learn)."""
    from preftune.data.formats import split_implicit_prompt

    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            p, c, r = split_implicit_prompt(row["chosen"], row["rejected"])
            yield row, ((p, c, r) if c.strip() and r.strip() and c != r else None)
