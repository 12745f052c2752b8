"""Written outputs: the demo's ``report.md``, ``samples.jsonl`` and console summary table, and the
reward-vs-KL frontier's ``report.md`` and console table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.lab.pareto import FrontierPoint, pareto_frontier
from preftune.lab.results import PolicyEvaluation
from preftune.model.generation import Sample
from preftune.rewards.annotator import sentiment_reward

__all__ = [
    "figure_rows",
    "format_frontier_table",
    "format_summary",
    "plain_summary",
    "write_frontier_report",
    "write_report",
    "write_samples",
]


def figure_rows(r: PolicyEvaluation) -> list[tuple[str, str]]:
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
        ("wall time [s]",
         f"{r.wall_time_s:.1f} (" + ", ".join(f"{k} {v:.1f}" for k, v in r.stage_times_s.items()) + ")"),
    ]


def plain_summary(r: PolicyEvaluation, settings: dict[str, Any]) -> list[str]:
    """The report's first lines: what happened, why train accuracy jumps, why some pairs are
    missing."""
    steps, batch = settings.get("steps", 0), settings.get("batch_size", 1)
    epochs = steps * batch / max(r.num_train_pairs, 1)
    asked = (settings.get("num_prompts"), settings.get("eval_prompts", 0) * settings.get("eval_samples", 0))
    return [
        f"**What happened.** pi_theta was trained with DPO for {steps} steps of {batch} pairs, {epochs:.2g} "
        f"passes over {r.num_train_pairs} training pairs. On held-out prompts its samples score r* "
        f"{r.reward_after:+.3f} against {r.reward_before:+.3f} for pi_ref (win rate {r.win_rate:.3f}), at a "
        f"KL of {r.kl:.2f} nats per sequence; the implicit reward ranks {r.heldout_accuracy:.1%} of held-out "
        "pairs like the annotator.",
        "",
        "**Why training accuracy jumps at each epoch boundary** (dotted lines on the training plot): from "
        "the second pass on, every training pair has been trained on before, so the model has partly "
        "memorised which side won; the held-out curve (its first point is pi_ref itself, at step 0) is the "
        "one that measures what was learned.",
        "",
        f"**Why {r.num_train_pairs} / {r.num_eval_pairs} pairs and not {asked[0]} / {asked[1]}:** a pair "
        "whose two continuations are identical, or one of them empty, says nothing about preference and is "
        "dropped before labelling.",
    ]


def format_summary(result: PolicyEvaluation) -> str:
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


def write_report(result: PolicyEvaluation, settings: dict[str, Any],
                 examples: Sequence[tuple[Sample, Sample]], path: str | Path, command: str = "") -> Path:
    """``report.md``: figures, settings, plots and example continuations before and after."""
    path = Path(path)
    lines = [
        "# preftune demo: DPO on the embedded TinyStories model",
        "",
        *plain_summary(result, settings),
        "",
        "pi_ref = the embedded pretrained stories260K model. Training pairs are two samples of pi_ref per "
        "story opening, labelled by a simulated annotator whose ground-truth reward is r*(x, y) = VADER "
        "compound sentiment of the continuation y, with P(y1 preferred) = sigmoid((r*(y1) - r*(y2)) / T). "
        "pi_theta is trained from pi_ref with DPO, "
        "L = -log sigmoid(beta [log pi_theta(y_w|x)/pi_ref(y_w|x) - log pi_theta(y_l|x)/pi_ref(y_l|x)]). "
        "All figures below are on held-out prompts.",
        "",
        "## Results",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in figure_rows(result)],
        "",
        "KL is the mean of log pi_theta(y|x) - log pi_ref(y|x) over samples y of pi_theta, scored on their "
        "exact token ids (a KL only at sampling temperature 1). Win rate pairs the samples of both models "
        "drawn with the same prompt and random seed. Held-out accuracy is the fraction of held-out labelled "
        "pairs with beta log(pi_theta/pi_ref)(y_w) > beta log(pi_theta/pi_ref)(y_l).",
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


_FRONTIER_COLUMNS = ("method", "setting", "reward ± stderr", "KL ± stderr [nats]", "KL/token", "win rate",
                     "train tokens", "sample tokens", "wall time [s]", "Pareto")


def _by_method(points: Sequence[FrontierPoint]) -> dict[str, list[FrontierPoint]]:
    """Points grouped by method (methods in order of first appearance), each group sorted by KL."""
    groups: dict[str, list[FrontierPoint]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    return {m: sorted(g, key=lambda p: (p.kl, p.reward)) for m, g in groups.items()}


def _frontier_rows(points: Sequence[FrontierPoint]) -> list[tuple[str, ...]]:
    """One row of display strings per point (columns of ``_FRONTIER_COLUMNS``), by method then KL;
    "Pareto" is ``*`` for the points on their method's frontier."""
    rows = []
    for method, group in _by_method(points).items():
        front = pareto_frontier(group)
        for p in group:
            rows.append((method, p.setting, f"{p.reward:+.4f} ± {p.reward_stderr:.4f}",
                         f"{p.kl:.3f} ± {p.kl_stderr:.3f}", f"{p.kl_per_token:.4f}",
                         "–" if p.win_rate is None else f"{p.win_rate:.3f}", f"{p.train_tokens:,}",
                         f"{p.sample_tokens:,}", f"{p.wall_time_s:.1f}", "*" if p in front else ""))
    return rows


def format_frontier_table(points: Sequence[FrontierPoint]) -> str:
    """A plain-text table of the runs for the terminal: one row per point, by method then KL."""
    table = [_FRONTIER_COLUMNS, *_frontier_rows(points)]
    widths = [max(len(row[c]) for row in table) for c in range(len(_FRONTIER_COLUMNS))]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip() for row in table]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def write_frontier_report(points: Sequence[FrontierPoint], path: str | Path, *, title: str, intro: str,
                          settings: dict[str, Any], command: str = "", plot_name: str = "frontier.png",
                          notes: Sequence[str] = ()) -> Path:
    """``report.md`` of a reward-vs-KL frontier: intro, one row per run (by method then KL), the compute
    spent per method, settings, the plot ``plot_name`` (omitted when empty) and notes."""
    path = Path(path)
    lines = [
        f"# {title}", "", intro, "",
        "## Runs", "",
        "x = KL(pi ‖ pi_ref) per sequence = mean of log pi(y|x) - log pi_ref(y|x) over samples y ~ pi; "
        "reward = mean ground-truth r* of held-out samples; ± = standard error s / sqrt(n). Win rate: "
        "P(r*(y_pi) > r*(y_ref)) + 1/2 P(tie). Train tokens pass forward and backward in training; sample "
        "tokens are generated (training data, rollouts, best-of-N candidates). `*` marks the method's "
        "Pareto frontier: no other run of it has KL <= and reward >=, one strictly.",
        "",
        "| " + " | ".join(_FRONTIER_COLUMNS) + " |",
        "|" + "---|" * len(_FRONTIER_COLUMNS),
        *["| " + " | ".join(_cell(c) for c in row) + " |" for row in _frontier_rows(points)],
        "",
        "## Compute per method", "",
        "| method | runs | wall time [s] | train tokens | sample tokens |",
        "|---|---|---|---|---|",
    ]
    for method, group in _by_method(points).items():
        lines.append(f"| {_cell(method)} | {len(group)} | {sum(p.wall_time_s for p in group):.1f} | "
                     f"{sum(p.train_tokens for p in group):,} | {sum(p.sample_tokens for p in group):,} |")
    lines += [
        "", "## Settings", "",
        *([f"Reproduce with `{command}`.", ""] if command else []),
        "| setting | value |",
        "|---|---|",
        *[f"| {_cell(str(k))} | {_cell(str(v))} |" for k, v in settings.items()],
        "",
    ]
    if plot_name:
        lines += ["## Plot", "", f"![reward vs KL frontier]({plot_name})", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
