"""A run's training curves as a PNG: what the trackers receive as the run's plot, and what the lab's
demo shows. Drawn on a bare ``matplotlib.figure.Figure``: pyplot and the process's backend are left
as they were (a notebook's stays interactive)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# the panels a run's plot shows, where its rows have them (first four found): (metric, title)
PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "implicit-reward accuracy"),
    ("rewards/margins", "implicit-reward margin  r_w - r_l"),
    ("perplexity", "perplexity"),
    ("env/score", "reward of the samples"),
    ("objective/kl", "KL(pi_theta || pi_ref) per sample"),
)


def plot_training(history: Sequence[dict[str, float]], eval_history: Sequence[dict[str, float]],
                  path: str | Path, *, panels: Sequence[tuple[str, str]] | None = None,
                  epoch_steps: int | None = None) -> Path:
    """Training (per logged row) and held-out (per evaluation) curves of ``panels`` (default: those of
    :data:`PANELS` the rows have, at most four) against the optimizer step, with a dotted line at each
    epoch boundary (every ``epoch_steps`` steps) when given."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [*history, *eval_history]
    if panels is None:
        panels = [(k, t) for k, t in PANELS if any(k in r or f"eval/{k}" in r for r in rows)][:4]
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.4))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    last = max((r["step"] for r in rows), default=0)
    for ax, (key, title) in zip(axes[0], panels):
        for k, boundary in enumerate(range(epoch_steps or last + 1, int(last), epoch_steps or 1)):
            ax.axvline(boundary, color="gray", linestyle=":", linewidth=1,
                       label="epoch boundary" if k == 0 else None)
        trained = [r for r in history if key in r]
        ax.plot([r["step"] for r in trained], [r[key] for r in trained], marker=".", label="train")
        held = [r for r in eval_history if f"eval/{key}" in r]
        if held:
            ax.plot([r["step"] for r in held], [r[f"eval/{key}"] for r in held], marker="o", label="held-out")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
