"""PNG plots of a preference-tuning run and of a reward-vs-KL frontier (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402

from preftune.engine.curves import plot_training as _plot_curves  # noqa: E402
from preftune.lab.pareto import FrontierPoint, pareto_frontier  # noqa: E402

__all__ = ["plot_frontier", "plot_reward_histogram", "plot_training"]

_PANELS = (
    ("loss", "DPO loss"),
    ("rewards/accuracies", "implicit-reward accuracy"),
    ("rewards/margins", "implicit-reward margin  r_w - r_l"),
)


def plot_training(history: Sequence[dict[str, float]], eval_history: Sequence[dict[str, float]],
                  path: str | Path, *, epoch_steps: int | None = None) -> Path:
    """Loss, accuracy and margin of the implicit reward r = beta log(pi_theta / pi_ref) against the
    optimizer step, training and held-out (:func:`preftune.engine.curves.plot_training`)."""
    return _plot_curves(history, eval_history, path, panels=_PANELS, epoch_steps=epoch_steps)


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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_frontier(points: Sequence[FrontierPoint], path: str | Path, *,
                  title: str = "held-out reward vs KL to pi_ref") -> Path:
    """Each run at (KL(pi || pi_ref) per sequence, mean ground-truth reward) with stderr bars on both
    axes, labelled by its setting; one colour and marker per method (in order of first appearance),
    and a line through each method's Pareto frontier (:func:`~preftune.lab.pareto.pareto_frontier`)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    methods = list(dict.fromkeys(p.method for p in points))
    colors = plt.get_cmap("tab10")
    for k, method in enumerate(methods):
        group = [p for p in points if p.method == method]
        color, marker = colors(k % 10), _MARKERS[k % len(_MARKERS)]
        ax.errorbar([p.kl for p in group], [p.reward for p in group], xerr=[p.kl_stderr for p in group],
                    yerr=[p.reward_stderr for p in group], fmt=marker, color=color, capsize=2, label=method)
        front = pareto_frontier(group)
        if len(front) > 1:
            ax.plot([p.kl for p in front], [p.reward for p in front], color=color, alpha=0.7)
        for p in group:
            ax.annotate(p.setting, (p.kl, p.reward), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color)
    ax.set_xlabel("KL(pi ‖ pi_ref) per sequence [nats]")
    ax.set_ylabel("mean ground-truth reward r*")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
