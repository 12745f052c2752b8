"""The results of ``preftune eval`` and their written forms: the result types (saved as ``eval.json``),
the plain-words summary, ``report.md``, ``samples.jsonl``, PNG plots (win rates with intervals, reward vs
KL, length distributions) and the console table."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.rows import Prompt, as_prompt
from preftune.eval.winrate import Leaderboard, WinRate

__all__ = ["EvalResult", "ModelEval", "PreferenceAccuracy", "format_console", "summarize", "write_outputs"]


@dataclass
class PreferenceAccuracy:
    """Accuracy and margin of r on preference pairs (see :mod:`preftune.eval.evaluate`);
    ``chosen``/``rejected``: mean r of each side; ``stderr`` = sqrt(acc (1 - acc) / n); ``dropped``:
    pairs equal after tokenization."""

    source: str  # "implicit reward" or "reward model"
    accuracy: float
    stderr: float
    margin: float
    margin_stderr: float
    chosen: float
    rejected: float
    num_pairs: int
    dropped: int = 0


@dataclass
class ModelEval:
    """Figures of one model. ``reward``: mean reward-judge score of its samples ± stderr; ``kl``:
    KL(pi || pi_ref) per sequence [nats] ± stderr; ``length``: mean generated tokens ± stderr;
    ``length_drift`` = length - the baseline's, ``length_ratio`` = their ratio; ``stop_rate``: share of
    samples that ended with a stop token; ``win_rates``: against the baseline, by judge."""

    name: str
    path: str
    kind: str  # "policy" or "reward_model"
    is_baseline: bool = False
    reward: float | None = None
    reward_stderr: float | None = None
    kl: float | None = None
    kl_stderr: float | None = None
    kl_per_token: float | None = None
    length: float | None = None
    length_stderr: float | None = None
    length_drift: float | None = None
    length_ratio: float | None = None
    stop_rate: float | None = None
    accuracy: PreferenceAccuracy | None = None
    win_rates: dict[str, WinRate] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Everything ``eval.json`` holds: ``models`` (the baseline first), the ``leaderboard`` under
    ``primary_judge``, plain-words ``summary`` lines, the settings and the files written."""

    models: list[ModelEval]
    leaderboard: Leaderboard | None
    primary_judge: str | None
    summary: list[str]
    num_prompts: int
    num_samples: int
    prompt_source: str
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def model(self, name: str) -> ModelEval:
        return next(m for m in self.models if m.name == name)


def _ci(low: float, high: float, digits: int = 3) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _pm(value: float | None, se: float | None, fmt: str = ".3f") -> str:
    if value is None:
        return "–"
    return f"{value:{fmt}}" + ("" if se is None else f" ± {se:{fmt}}")


def _policies(result: EvalResult) -> list[ModelEval]:
    return [m for m in result.models if m.kind == "policy"]


def _win_sentences(m: ModelEval, base: ModelEval, judge: str, w: WinRate, level: str) -> list[str]:
    """Whether ``m`` beats the baseline under ``judge``, at equal length too, and the swap agreement."""
    verdict = "beats" if w.low > 0.5 else "loses to" if w.high < 0.5 else "is not distinguishable from"
    words = [f"**{m.name}** {verdict} the baseline {base.name} under {judge}: win rate {w.rate:.3f} "
             f"{_ci(w.low, w.high)} ({level} bootstrap interval over {w.num_prompts} prompts, ties 1/2; "
             f"{w.wins} wins, {w.ties} ties, {w.losses} losses)."]
    lc = f"At equal length the win rate would be {w.lc_rate:.3f} {_ci(w.lc_low, w.lc_high)}"
    longer = "longer" if w.length_slope > 0 else "shorter"
    if w.low > 0.5 or w.high < 0.5:
        gain = "gain" if w.low > 0.5 else "loss"
        survives = w.lc_low > 0.5 if w.low > 0.5 else w.lc_high < 0.5
        words.append(f"{lc}: the {gain} survives length control." if survives else
                     f"{lc}: the {gain} does not survive length control (the judge prefers {longer} "
                     f"samples, slope {w.length_slope:+.2f} per sd of the length difference).")
    else:
        words.append(f"{lc}.")
    if w.agreement is not None:
        words.append(f"The pairwise judge picked the same winner in both orders for {w.agreement:.0%} of "
                     f"the samples (preference for the first position: {w.first_position_rate:.3f}).")
    return words


def _policy_sentences(m: ModelEval, base: ModelEval, judge: str | None, level: str) -> list[str]:
    """The sentences of one policy against the baseline: win rate, length, KL, accuracy."""
    w = m.win_rates.get(judge) if judge else None
    words = _win_sentences(m, base, judge, w, level) if w is not None else []
    if m.length is not None and base.length:
        words.append(f"Its samples average {m.length:.1f} tokens against the baseline's {base.length:.1f} "
                     f"({100 * (m.length_ratio - 1):+.0f}%).")
    if m.kl is not None:
        words.append(f"KL(pi ‖ pi_ref) = {m.kl:.2f} ± {m.kl_stderr:.2f} nats per sequence.")
    if m.accuracy is not None:
        base_acc = f" (baseline {base.accuracy.accuracy:.3f})" if base.accuracy is not None else ""
        words.append(f"Implicit-reward accuracy on {m.accuracy.num_pairs} pairs: {m.accuracy.accuracy:.3f}"
                     f"{base_acc}, mean margin {m.accuracy.margin:+.3f}.")
    return words


def summarize(result: EvalResult) -> list[str]:
    """Plain sentences: who wins and by how much, whether it survives length control, length, KL,
    accuracy."""
    lines: list[str] = []
    judge, policies = result.primary_judge, _policies(result)
    base = policies[0]
    level = f"{100 * result.settings.get('level', 0.95):g}%"
    for m in policies[1:]:
        words = _policy_sentences(m, base, judge, level)
        if words:
            lines.append(" ".join(words))
    for m in result.models:
        if m.kind == "reward_model" and m.accuracy is not None:
            lines.append(f"**{m.name}** (reward model): accuracy {m.accuracy.accuracy:.3f} "
                         f"± {m.accuracy.stderr:.3f} on {m.accuracy.num_pairs} pairs, "
                         f"mean margin {m.accuracy.margin:+.3f}.")
    board = result.leaderboard
    if board is not None and len(board.rows) > 2:
        top = board.rows[0]
        lines.append(f"Leaderboard under {board.judge}: the baseline **{top.name}** ranks first." if
                     top.name == board.baseline else
                     f"Leaderboard under {board.judge}: **{top.name}** ranks first, P(beats the baseline) = "
                     f"{top.p_beats_baseline:.3f} {_ci(top.p_low, top.p_high)}.")
    return lines


# ---- files ---------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(result: EvalResult, path: Path) -> Path:
    """Raw and length-controlled win rate of each model against the baseline, with intervals, per
    judge."""
    plt = _plt()
    rows = [(m.name, label, w) for m in _policies(result)[1:] for label, w in m.win_rates.items()]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.8))
    x = np.arange(len(rows))
    for offset, key, color, text in ((-0.17, "", "tab:blue", "win rate"),
                                     (0.17, "lc_", "tab:orange", "length-controlled")):
        values = np.array([getattr(w, f"{key}rate") for _, _, w in rows])
        low = np.array([getattr(w, f"{key}low") for _, _, w in rows])
        high = np.array([getattr(w, f"{key}high") for _, _, w in rows])
        ax.errorbar(x + offset, values, yerr=[values - low, high - values], fmt="o", color=color, capsize=4,
                    label=text)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{n}\n({label})" for n, label, _ in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs baseline")
    ax.set_title(f"win rate against {result.models[0].name} "
                 f"({100 * result.settings['level']:g}% bootstrap intervals)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward_kl(result: EvalResult, path: Path) -> Path:
    """Each model at (KL(pi ‖ pi_ref), mean reward) with stderr bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in _policies(result):
        if m.kl is None or m.reward is None:
            continue
        ax.errorbar([m.kl], [m.reward], xerr=[m.kl_stderr], yerr=[m.reward_stderr],
                    fmt="s" if m.is_baseline else "o", capsize=3)
        ax.annotate(m.name + (" (baseline)" if m.is_baseline else ""), (m.kl, m.reward),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("KL(pi ‖ pi_ref) per sequence [nats]")
    ax.set_ylabel(f"mean reward ({result.settings.get('judge')})")
    ax.set_title("reward vs KL to the reference")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lengths(lengths: dict[str, np.ndarray], path: Path) -> Path:
    """Histograms of the generated length (tokens) of each model's samples, with means."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    top = max(int(v.max()) for v in lengths.values()) if lengths else 1
    bins = np.linspace(0, top + 1, min(top + 2, 30))
    for k, (name, values) in enumerate(lengths.items()):
        color = plt.get_cmap("tab10")(k % 10)
        ax.hist(values, bins=bins, alpha=0.45, color=color, label=f"{name} (mean {values.mean():.1f})")
        ax.axvline(values.mean(), color=color, linestyle="--")
    ax.set_xlabel("generated tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title("length of samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows], ""]


def _models_section(result: EvalResult) -> list[str]:
    """The table of every model's reward, KL, length, drift and stop rate."""
    return ["## Models", ""] + _table(
        ["model", "kind", f"mean reward ({result.settings.get('judge')})", "KL(pi ‖ pi_ref) [nats]",
         "KL / token", "length [tokens]", "drift vs baseline", "stopped"],
        [[m.name + (" (baseline)" if m.is_baseline else ""), m.kind, _pm(m.reward, m.reward_stderr),
          _pm(m.kl, m.kl_stderr), _pm(m.kl_per_token, None, ".4f"), _pm(m.length, m.length_stderr, ".1f"),
          "–" if m.length_drift is None else f"{m.length_drift:+.1f} (x{m.length_ratio:.2f})",
          _pm(m.stop_rate, None, ".2f")] for m in result.models])


def _win_rate_section(result: EvalResult, level: str) -> list[str]:
    """The method of the win rates and their table (nothing without a judge)."""
    win_rows = [[m.name, label, f"{w.rate:.3f} {_ci(w.low, w.high)}", f"{w.wins}/{w.ties}/{w.losses}",
                 f"{w.lc_rate:.3f} {_ci(w.lc_low, w.lc_high)}", f"{w.length_slope:+.2f}",
                 "–" if w.agreement is None else f"{w.agreement:.3f}",
                 "–" if w.first_position_rate is None else f"{w.first_position_rate:.3f}"]
                for m in _policies(result)[1:] for label, w in m.win_rates.items()]
    if not win_rows:
        return []
    lines = ["## Win rate against the baseline", "",
             "W = mean over paired samples of s, s = 1[r(a) > r(b)] + 1/2 1[tie] for a reward, "
             "s = (J(a, b) + 1 - J(b, a)) / 2 for a pairwise judge J judged in both orders. Intervals: "
             "percentile bootstrap over prompts "
             f"({result.settings['bootstrap']} resamples; whole prompts, since the samples of one prompt "
             "are not independent). LC = sigmoid(theta_0) of the logistic fit "
             "P(win) = sigmoid(theta_0 + theta_1 d / sd(d)), d = length difference in tokens: the win rate "
             "at equal length (as length-controlled AlpacaEval); slope = theta_1. Agreement: both orders "
             "pick the same winner.", ""]
    return lines + _table(["model", "judge", f"win rate [{level}]", "wins/ties/losses",
                           f"LC win rate [{level}]", "length slope", "swap agreement", "first-position rate"],
                          win_rows)


def _accuracy_section(result: EvalResult) -> list[str]:
    """The method of the preference accuracy and its table (nothing without pairs)."""
    acc_rows = [[m.name + (" (baseline)" if m.is_baseline else ""), m.accuracy.source,
                 _pm(m.accuracy.accuracy, m.accuracy.stderr),
                 _pm(m.accuracy.margin, m.accuracy.margin_stderr),
                 f"{m.accuracy.chosen:+.3f} / {m.accuracy.rejected:+.3f}", str(m.accuracy.num_pairs)]
                for m in result.models if m.accuracy is not None]
    if not acc_rows:
        return []
    lines = ["## Preference accuracy on pairs", "",
             "Implicit reward r = beta [log pi(y|x) - log pi_ref(y|x)], "
             f"beta = {result.settings['beta']}; a reward model's own score otherwise. Accuracy = share of "
             "pairs with r(chosen) > r(rejected) (ties 1/2, soft labels weighted); margin = mean r(chosen) - "
             "r(rejected).", ""]
    return lines + _table(["model", "reward", "accuracy", "mean margin", "mean r chosen / rejected", "pairs"],
                          acc_rows)


def _leaderboard_section(board: Leaderboard | None, level: str) -> list[str]:
    """The method of the Bradley-Terry leaderboard and its table (nothing without one)."""
    if board is None:
        return []
    lines = ["## Bradley-Terry leaderboard", "",
             f"Every pair of models compared on the same samples under {board.judge} (ties split); strengths "
             f"relative to the baseline with {level} Wald intervals, which treat each judgment as an "
             "independent game." + (f" {board.note}." if board.note else ""), ""]
    return lines + _table(["rank", "model", "strength vs baseline", "P(beats baseline)", "wins", "losses"],
                          [[str(r.rank), r.name, "1 (baseline)" if r.name == board.baseline else
                            f"{r.strength:.2f} {_ci(r.low, r.high, 2)}",
                            "–" if r.name == board.baseline
                            else f"{r.p_beats_baseline:.3f} {_ci(r.p_low, r.p_high)}",
                            f"{r.wins:.1f}", f"{r.losses:.1f}"] for r in board.rows])


def write_report(result: EvalResult, path: Path, examples: Sequence[tuple[str, dict[str, str]]]) -> Path:
    """``report.md``: summary, tables of models, win rates, accuracy and the leaderboard, method, plots,
    examples."""
    policies, base = _policies(result), result.models[0]
    level = f"{100 * result.settings['level']:g}%"
    lines = [f"# preftune eval: {len(result.models) - 1} model(s) against {base.name}", "",
             f"Prompts: {result.prompt_source}; {result.num_samples} samples per prompt and model, the same "
             "seeds for every model, so each comparison is paired sample by sample.", "", "## Summary", "",
             *[f"- {s}" for s in result.summary], *[f"- note: {n}" for n in result.notes], ""]
    lines += _models_section(result)
    lines += _win_rate_section(result, level)
    lines += _accuracy_section(result)
    lines += _leaderboard_section(result.leaderboard, level)
    lines += ["## Plots", ""] + [f"![{role}]({Path(f).name})" for role, f in result.files.items()
                                  if f.endswith(".png")] + [""]
    if examples:
        names = [m.name for m in policies]
        lines += ["## Examples (first sample of the first prompts)", ""]
        lines += _table(["prompt", *names], [[p, *[outs.get(n, "") for n in names]] for p, outs in examples])
    lines += ["## Settings", ""] + _table(["setting", "value"],
                                          [[k, str(v)] for k, v in result.settings.items()])
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_outputs(result: EvalResult, out: Path, prompts: Sequence[str | Prompt], texts: dict[str, list[str]],
                  lengths: dict[str, np.ndarray], rewards: dict[str, np.ndarray],
                  num_examples: int = 4) -> None:
    """samples.jsonl, the plots and report.md under ``out``; fills ``result.files`` (eval.json included)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"eval": out / "eval.json", "report": out / "report.md", "samples": out / "samples.jsonl"}
    prompts = [as_prompt(p) for p in prompts]
    with open(files["samples"], "w", encoding="utf-8") as f:
        for n, prompt in enumerate(prompts):
            images = prompt.images_field()
            row = {"prompt": prompt.text, **images, "sample": n % result.num_samples,
                   "outputs": {name: {"text": texts[name][n], "tokens": int(lengths[name][n]),
                                      **({"reward": float(rewards[name][n])} if name in rewards else {})}
                               for name in texts}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if any(m.win_rates for m in result.models):
        files["win_rates_plot"] = plot_win_rates(result, out / "win_rates.png")
    if any(m.kl is not None and m.reward is not None for m in result.models):
        files["reward_kl_plot"] = plot_reward_kl(result, out / "reward_kl.png")
    if lengths:
        files["lengths_plot"] = plot_lengths(lengths, out / "lengths.png")
    result.files = {k: str(v) for k, v in files.items()}
    k = result.num_samples
    examples = [(prompts[n].text, {name: t[n] for name, t in texts.items()})
                for n in range(0, len(prompts), k)]
    write_report(result, files["report"], examples[:num_examples])


def format_console(result: EvalResult) -> str:
    """The summary, one row per model, and where the report is."""
    judge = result.primary_judge
    rows = [("model", "win rate [CI]", "LC win rate [CI]", "KL [nats]", "length", "accuracy")]
    for m in result.models:
        w = m.win_rates.get(judge) if judge else None
        rows.append((m.name + (" (baseline)" if m.is_baseline else ""),
                     f"{w.rate:.3f} {_ci(w.low, w.high)}" if w else "–",
                     f"{w.lc_rate:.3f} {_ci(w.lc_low, w.lc_high)}" if w else "–",
                     _pm(m.kl, m.kl_stderr, ".2f"),
                     _pm(m.length, None, ".1f"), _pm(m.accuracy.accuracy if m.accuracy else None, None)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    rule = "-" * max(len(t) for t in table)
    summary = [textwrap.fill(s.replace("**", ""), 110) for s in result.summary]
    return "\n".join([*summary, rule, table[0], rule, *table[1:], rule, f"judge: {judge}",
                      f"report: {result.files.get('report', '')}"])
