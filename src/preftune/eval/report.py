"""The demo's written outputs: ``report.md``, ``samples.jsonl`` and the console summary table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.eval.generation import Sample
from preftune.eval.judge import sentiment_reward

if TYPE_CHECKING:
    from preftune.lab.demo import DemoResult

__all__ = ["figure_rows", "format_summary", "write_report", "write_samples"]


def figure_rows(r: DemoResult) -> list[tuple[str, str]]:
    """(figure, value) rows shared by the report and the console summary."""
    return [
        ("mean r* of pi_ref samples (before)", f"{r.reward_before:+.4f} ± {r.reward_before_stderr:.4f}"),
        ("mean r* of pi_theta samples (after)", f"{r.reward_after:+.4f} ± {r.reward_after_stderr:.4f}"),
        ("win rate of pi_theta over pi_ref under r* (ties 1/2)", f"{r.win_rate:.3f}"),
        ("KL(pi_theta ‖ pi_ref) per sequence [nats]", f"{r.kl:.3f} ± {r.kl_stderr:.3f}"),
        ("KL per generated token [nats]", f"{r.kl_per_token:.4f}"),
        ("held-out implicit-reward accuracy", f"{r.heldout_accuracy:.3f}"),
        ("training implicit-reward accuracy (last window)", f"{r.train_accuracy:.3f}"),
        ("training labels agreeing with r* (ties excluded)", f"{r.label_agreement:.3f}"),
        ("pairs: train / held-out; held-out samples per model",
         f"{r.num_train_pairs} / {r.num_eval_pairs}; {r.num_eval_samples}"),
        ("wall time [s]", f"{r.wall_time_s:.1f} (" + ", ".join(f"{k} {v:.1f}" for k, v in r.stage_times_s.items())
         + ")"),
    ]


def format_summary(result: DemoResult) -> str:
    """A plain-text table for the terminal."""
    rows = figure_rows(result)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule, f"report: {Path(result.output_dir) / 'report.md'}"])


def _cell(text: str, limit: int = 400) -> str:
    """Markdown-table-safe text: one line, pipes escaped, long text cut."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_samples(before: Sequence[Sample], after: Sequence[Sample], r_before: Sequence[float],
                  r_after: Sequence[float], path: str | Path) -> Path:
    """One row per (prompt, seed): the pi_ref and pi_theta continuations and their r*."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for b, a, rb, ra in zip(before, after, r_before, r_after):
            f.write(json.dumps({"prompt": b.prompt, "reference": b.text, "reference_reward": rb,
                                "policy": a.text, "policy_reward": ra}, ensure_ascii=False) + "\n")
    return path


def write_report(result: DemoResult, settings: dict[str, Any], examples: Sequence[tuple[Sample, Sample]],
                 path: str | Path, command: str = "") -> Path:
    """``report.md``: figures, settings, plots and example continuations before and after."""
    path = Path(path)
    lines = [
        "# preftune demo: DPO on the embedded TinyStories model",
        "",
        "pi_ref = the embedded pretrained stories260K model. Training pairs are two samples of pi_ref per story "
        "opening, labelled by a simulated annotator whose ground-truth reward is r*(x, y) = VADER compound "
        "sentiment of the continuation y, with P(y1 preferred) = sigmoid((r*(y1) - r*(y2)) / T). pi_theta is "
        "trained from pi_ref with DPO, L = -log sigmoid(beta [log pi_theta(y_w|x)/pi_ref(y_w|x) - "
        "log pi_theta(y_l|x)/pi_ref(y_l|x)]). All figures below are on held-out prompts.",
        "",
        "## Results",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in figure_rows(result)],
        "",
        "KL is the mean of log pi_theta(y|x) - log pi_ref(y|x) over samples y of pi_theta, scored on their exact "
        "token ids (a KL only at sampling temperature 1). Win rate pairs the samples of both models drawn with "
        "the same prompt and random seed. Held-out accuracy is the fraction of held-out labelled pairs with "
        "beta log(pi_theta/pi_ref)(y_w) > beta log(pi_theta/pi_ref)(y_l).",
        "",
        "## Settings",
        "",
        *([f"Reproduce with `{command}`.", ""] if command else []),
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "## Plots",
        "",
        "![training curves](training.png)",
        "",
        "![ground-truth reward before vs after](rewards.png)",
        "",
        "## Example continuations (held-out prompts, same seed for both models)",
        "",
        "| prompt | pi_ref (r*) | pi_theta (r*) |",
        "|---|---|---|",
    ]
    for before, after in examples:
        r_b, r_a = sentiment_reward([before.text, after.text])
        lines.append(f"| {_cell(before.prompt)} | {_cell(before.text)} ({r_b:+.2f}) | "
                     f"{_cell(after.text)} ({r_a:+.2f}) |")
    lines += ["", "Files: " + ", ".join(f"`{Path(v).name}`" for v in result.files.values()), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
