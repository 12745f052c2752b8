"""The model card of a trained model: ``final/README.md`` as the Hugging Face hub reads it.

A YAML header (base model and datasets where they are hub ids, ``library_name: transformers``, tags,
license where known, pipeline tag), then for a reader without the run directory: the method and its
citation, the settings that changed the result (those that differ from the defaults), the run's
last training and evaluation figures, the framework versions and the command that reproduces it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from preftune.data.sources import HUB_ID

FRAMEWORKS = ("preftune", "torch", "transformers", "accelerate", "peft", "datasets")
#: settings a reader looks for first, shown whether they are defaults or not
KEY_SETTINGS = ("model", "loss", "loss_params", "reference", "learning_rate", "batch_size",
                "gradient_accumulation_steps", "max_steps", "epochs", "max_length", "max_prompt_length",
                "lora", "kl_coef", "seed")
#: figures shown first when a row has them (others follow, up to a dozen in all)
KEY_FIGURES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
               "perplexity", "env/reward", "objective/kl", "grad_norm")


@dataclass(frozen=True)
class MethodCard:
    """What a method says of itself in its models' cards: ``title`` (e.g. ``DPO (sigmoid, beta=0.1)``),
    the ``command`` that trains it, hub ``tags``, a BibTeX ``citation`` and the ``pipeline_tag``."""

    title: str
    command: str
    tags: tuple[str, ...] = ()
    citation: str = ""
    pipeline_tag: str = "text-generation"
    notes: tuple[str, ...] = field(default_factory=tuple)


def changed_settings(settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings whose value differs from the config's default (what changed the result)."""
    return {k: v for k, v in settings.items() if k in defaults and v != defaults[k]}


def reproduce_command(command: str, changed: dict[str, Any]) -> str:
    """``preftune COMMAND --key value ...`` for the changed settings (nested values as YAML-ish JSON)."""
    parts = ["preftune", command]
    for key, value in changed.items():
        shown = json.dumps(value) if isinstance(value, dict | list | bool) or value is None else str(value)
        parts += [f"--{key}", shown]
    return " ".join(shlex.quote(p) for p in parts)


def _versions() -> list[str]:
    out = []
    for name in FRAMEWORKS:
        try:
            out.append(f"- {name} {version(name)}")
        except PackageNotFoundError:
            continue
    return out


def _figures(row: dict[str, Any] | None) -> list[str]:
    if not row:
        return []
    keys = [k for k in KEY_FIGURES if k in row] + [k for k in row if k not in KEY_FIGURES and k != "step"]
    return [f"| {k} | {row[k]:.4g} |" for k in keys[:12] if isinstance(row[k], int | float)]


def _header(card: MethodCard, model: str | None, files: list[str], license_name: str | None) -> list[str]:
    lines = ["---"]
    if model and HUB_ID.match(model) and not Path(model).exists():
        lines.append(f"base_model: {model}")
    datasets = [f for f in files if HUB_ID.match(f) and not Path(f).exists()]
    if datasets:
        lines += ["datasets:", *(f"- {d}" for d in datasets)]
    lines += ["library_name: transformers", f"pipeline_tag: {card.pipeline_tag}", "tags:",
              *(f"- {t}" for t in ("preftune", *card.tags))]
    if license_name:
        lines.append(f"license: {license_name}")
    return [*lines, "---", ""]


def write_model_card(directory: Path, card: MethodCard, *, model: str | None, files: list[str],
                     settings: dict[str, Any], defaults: dict[str, Any], history: list[dict[str, Any]],
                     eval_history: list[dict[str, Any]], steps: int, license_name: str | None = None) -> Path:
    """Write ``directory/README.md`` (see the module docstring) and return its path."""
    changed = changed_settings(settings, defaults)
    source = model if model not in (None, "", "embedded") else "stories260K, the model embedded in preftune"
    lines = _header(card, model, files, license_name)
    lines += [f"# {Path(str(directory)).parent.name or 'model'}: {card.title}", "",
              f"Trained with [preftune](https://github.com/preftune/preftune) `{card.command}` from "
              f"**{source}** on {', '.join(f'`{f}`' for f in files) or 'its data'}, {steps} optimizer steps.",
              *card.notes, "", "## Settings that changed the result", "",
              "Every other setting is preftune's default." if changed
              else "All settings are preftune's defaults.", ""]
    lines += ["```yaml", *(f"{k}: {json.dumps(v)}" for k, v in changed.items()), "```", ""] if changed else []
    shown = [(k, settings[k]) for k in KEY_SETTINGS if k in settings]
    if shown:
        lines += ["Key settings (default or not):", "", "| setting | value |", "|---|---|",
                  *(f"| {k} | `{json.dumps(v)}` |" for k, v in shown), ""]
    for title, row in (("Training (the last logged row)", history[-1] if history else None),
                       ("Evaluation (the last held-out row)", eval_history[-1] if eval_history else None)):
        figures = _figures(row)
        if figures:
            lines += [f"## {title}", "", "| metric | value |", "|---|---:|", *figures, ""]
    lines += ["## Reproduce", "", "```bash", reproduce_command(card.command, changed), "```", "",
              "## Framework versions", "", *_versions(), ""]
    if card.citation:
        lines += ["## Citation", "", "```bibtex", card.citation.strip(), "```", ""]
    path = Path(directory) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
