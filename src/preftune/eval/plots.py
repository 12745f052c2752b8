"""PNG plots of a preference-tuning run (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_reward_histogram", "plot_training"]

_PANELS = (
    ("loss", "DPO loss"),
    ("rewards/accuracies", "implicit-reward accuracy"),
    ("rewards/margins", "implicit-reward margin  r_w - r_l"),
)


def plot_training(history: Sequence[dict[str, float]], eval_history: Sequence[dict[str, float]],
                  path: str | Path) -> Path:
    """Loss, accuracy and margin of the implicit reward r = beta log(pi_theta / pi_ref) against
    the optimizer step: training (per logging window) and held-out (per evaluation) curves."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.4))
    for ax, (key, title) in zip(axes, _PANELS):
        rows = [r for r in history if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label="train")
        held = [r for r in eval_history if f"eval/{key}" in r]
        if held:
            ax.plot([r["step"] for r in held], [r[f"eval/{key}"] for r in held], marker="o", label="held-out")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward_histogram(before: Sequence[float], after: Sequence[float], path: str | Path, *,
                          labels: tuple[str, str] = ("pi_ref", "pi_theta"), bins: int = 21) -> Path:
    """Histograms of the ground-truth reward r*(x, y) of samples before and after training, with means."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    edges = [-1.0 + 2.0 * k / bins for k in range(bins + 1)]  # r* = VADER compound lies in [-1, 1]
    for values, label, color in ((before, labels[0], "tab:gray"), (after, labels[1], "tab:orange")):
        mean = sum(values) / max(len(values), 1)
        ax.hist(values, bins=edges, alpha=0.55, color=color, label=f"{label} (mean {mean:+.3f})")
        ax.axvline(mean, color=color, linestyle="--")
    ax.set_xlabel("ground-truth reward r* (VADER compound)")
    ax.set_ylabel("samples")
    ax.set_title("held-out samples: reward before vs after DPO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
