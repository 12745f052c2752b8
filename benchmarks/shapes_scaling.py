"""The scaling part of ``shapes-render`` (``shapes_report.py``): step time and memory of ``head20``, both
trainers' defaults, against sequence length (``fixed<L>``), the prompt's share of it (``fixed1024p<P>``) and
the batch size (the short workload), as a table and a figure."""

from __future__ import annotations

import os
import re
from pathlib import Path

GiB = 2**30
Point = tuple[int, int, dict | None, dict | None]  # (x, batch, preftune row, TRL row)


def scaling_section(rows: list[dict], plot: Path, out: Path) -> list[str]:
    """The section "How cost grows" of the tables in ``out``, and its figure drawn to ``plot``."""
    series = scaling_series(rows)
    if not any(series.values()):
        return []
    lines = ["", "## How cost grows", "",
             "`head20`, both defaults. Length: `fixed<L>` (prompt L/4, chosen and rejected 3L/4 tokens each, "
             "every sequence exactly L tokens, max_length L), batch 4. Prompt share: `fixed1024p<P>` "
             "(prompt P% of 1,024 tokens, completions the rest), batch 4. Batch: the short workload (prompt "
             "64, completions 64-192) at 1-16 pairs per step. Per-pair figures: steady CPU seconds per step "
             "/ batch.", "",
             "| series | x | batch | trainer | CPU s/step | CPU s/pair | peak RSS GiB | "
             "preftune / TRL (per pair) | load |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, points in series.items():
        for x, batch, pt, trl in points:
            for r in (pt, trl):
                if r is None:
                    continue
                faster = (f"{trl['steady_cpu_step_s'] / pt['steady_cpu_step_s']:.2f}x faster"
                          if r is pt and trl is not None else "")
                step = r["steady_cpu_step_s"] / r["threads"]
                lines.append(f"| {name} | {x} | {batch} | `{r['run']}` | {step:.2f} | {step / batch:.3f} | "
                             f"{r['peak_rss'] / GiB:.2f} | {faster} | {r['loadavg']:.1f} |")
    if plot_scaling(series, plot):
        link = os.path.relpath(plot.resolve(), out.resolve().parent)
        lines += ["", f"![step time and peak memory against length, prompt share and batch]({link})"]
    return lines


def scaling_series(rows: list[dict]) -> dict[str, list[Point]]:
    """(x, batch, preftune row, TRL row) per series: sequence length, prompt share (%), batch size."""
    def pick(workload: str, batch: int, run: str) -> dict | None:
        found = [r for r in rows
                 if (r["shape"], r["workload"], r["batch"], r["run"]) == ("head20", workload, batch, run)]
        return found[-1] if found else None

    def point(x: int, workload: str, batch: int) -> Point:
        return x, batch, pick(workload, batch, "preftune:default"), pick(workload, batch, "trl:default")

    lengths = sorted({int(m.group(1)) for r in rows if (m := re.fullmatch(r"fixed(\d+)", r["workload"]))})
    shares = sorted({int(m.group(1)) for r in rows if (m := re.fullmatch(r"fixed1024p(\d+)", r["workload"]))})
    batches = sorted({r["batch"] for r in rows if r["shape"] == "head20" and r["workload"] == "synthetic"})
    series = {
        "length L": [point(n, f"fixed{n}", 4) for n in lengths],
        "prompt share %": sorted([point(p, f"fixed1024p{p}", 4) for p in shares]
                                 + ([point(25, "fixed1024", 4)] if 1024 in lengths else [])),
        "batch (short workload)": [point(b, "synthetic", b) for b in batches],
    }
    return {k: [p for p in v if p[2] or p[3]] for k, v in series.items()}


def plot_scaling(series: dict[str, list], path: Path) -> Path | None:
    """CPU s per pair and peak RSS against each series' x, preftune and TRL; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [k for k, v in series.items() if v]
    fig, axes = plt.subplots(2, len(names), figsize=(4.5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        ax_t, ax_m = axes[0][col], axes[1][col]
        for idx, (label, style) in enumerate((("preftune:default", "o-"), ("trl:default", "s--"))):
            pts = [(x, b, runs[idx]) for x, b, *runs in series[name] if runs[idx]]
            if not pts:
                continue
            xs = [x for x, _, _ in pts]
            ax_t.plot(xs, [r["steady_cpu_step_s"] / r["threads"] / b for _, b, r in pts], style, label=label)
            ax_m.plot(xs, [r["peak_rss"] / GiB for _, _, r in pts], style, label=label)
        for ax, title in ((ax_t, "CPU s per pair (steady)"), (ax_m, "peak RSS, GiB")):
            if name != "prompt share %":
                ax.set_xscale("log", base=2)
            ax.set_xlabel(name)
            ax.set_title(f"{title} vs {name}")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle("shape head20, fp32, 1 thread: preftune default vs TRL default")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
