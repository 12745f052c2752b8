"""PNG plots of an inspection (matplotlib, headless Agg backend, imported when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_length_bias(chars: np.ndarray, tokens: np.ndarray | None, path: str | Path) -> Path:
    """Chosen vs rejected length per pair (chars, log-log, y = x line) and histograms of
    D = L_chosen - L_rejected in characters and, with a tokenizer, tokens."""
    plt = _plt()
    panels = 3 if tokens is not None and len(tokens) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.6))
    c, r = chars[:, 1], chars[:, 2]
    ax = axes[0]
    ax.scatter(np.maximum(r, 1), np.maximum(c, 1), s=4, alpha=0.3)
    top = max(int(max(c.max(initial=1), r.max(initial=1))), 2)
    ax.plot([1, top], [1, top], color="black", linewidth=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="rejected length [chars]",
        ylabel="chosen length [chars]",
        title="pairs above the line: chosen longer",
    )
    for ax, lengths, unit in zip(axes[1:], (chars, tokens), ("chars", "tokens")):
        d = lengths[:, 1] - lengths[:, 2]
        ax.hist(d, bins=min(60, max(len(set(d.tolist())), 5)), color="tab:blue", alpha=0.8)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.axvline(float(d.mean()), color="tab:red", linestyle="--", label=f"mean {d.mean():+.1f}")
        ax.set(
            xlabel=f"chosen - rejected [{unit}]",
            ylabel="pairs",
            title=f"chosen longer in {100 * (d > 0).mean():.1f}% of pairs",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_token_lengths(tokens: np.ndarray, budgets: dict[str, Any], path: str | Path) -> Path:
    """Histograms of prompt / chosen / rejected token lengths with the budgets as vertical lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13.2, 3.6))
    limits = {
        "prompt": budgets.get("max_prompt_length"),
        "chosen": budgets.get("max_completion_length"),
        "rejected": budgets.get("max_completion_length"),
    }
    for k, (ax, part) in enumerate(zip(axes, ("prompt", "chosen", "rejected"))):
        ax.hist(tokens[:, k], bins=50, color=("tab:gray", "tab:green", "tab:red")[k], alpha=0.8)
        for value, label, style in (
            (limits[part], f"max_{'prompt' if k == 0 else 'completion'}_length", "--"),
            (budgets.get("max_length"), "max_length", ":"),
        ):
            if value is not None:
                ax.axvline(value, color="black", linestyle=style, label=f"{label} {value}")
        ax.set(xlabel=f"{part} tokens (untruncated)", ylabel="pairs", title=part)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_margins(margins: np.ndarray, flips: dict[str, Any], path: str | Path) -> Path:
    """Histogram of the model's margins m = score(chosen) - score(rejected) with the fitted mirror
    mixture (1 - e) N(mu, s) + e N(-mu, s), scaled to the counts."""
    plt = _plt()
    m = margins[~np.isnan(margins)]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    counts, edges, _ = ax.hist(m, bins=60, color="tab:blue", alpha=0.7, label="pairs")
    e, mu, sd = flips["rate"], flips["clean_margin"]["mean"], max(flips["clean_margin"]["sd"], 1e-9)
    x = np.linspace(edges[0], edges[-1], 400)
    scale = len(m) * (edges[1] - edges[0]) / (sd * np.sqrt(2 * np.pi))
    ax.plot(x, (1 - e) * scale * np.exp(-0.5 * ((x - mu) / sd) ** 2), color="tab:green", label="clean fit")
    ax.plot(
        x,
        e * scale * np.exp(-0.5 * ((x + mu) / sd) ** 2),
        color="tab:red",
        label=f"flipped fit (e = {e:.3f})",
    )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(
        xlabel="margin m (chosen - rejected)",
        ylabel="pairs",
        title=f"{flips['flagged']['count']} pairs flagged as likely flips",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
