"""Diagnostics during training: warn once, with a sentence that explains it, when a run shows a
known failure pattern. Each monitor reads the logged rows (training windows and evaluations) and
returns a :class:`Diagnosis` at most once per run.

* :class:`LikelihoodDisplacement`: the chosen log-prob falls while the margin grows (DPO pushes
  both responses down, the rejected one faster; Razin et al. 2024, Pal et al. 2024);
* :class:`Overfitting`: the held-out implicit-reward accuracy stops rising while the training one
  keeps rising (memorised pairs, typically from the second epoch on);
* :class:`LengthDrift`: the generation length moves by more than ``tolerance`` (relative) from its
  first value (length exploitation); read from ``rollout/length`` (PPO) or
  ``eval/generation_length`` (iterative rounds, evaluations);
* :class:`StuckAtLog2`: the loss stays at log 2 with a zero margin: the policy equals the
  reference at every step, so nothing is learnt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Diagnosis", "Diagnostics", "LengthDrift", "LikelihoodDisplacement", "Overfitting", "StuckAtLog2",
           "default_monitors"]


@dataclass(frozen=True)
class Diagnosis:
    name: str
    step: int
    message: str

    def row(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` row that records it."""
        return {"step": self.step, "warning": self.name, "message": self.message}


class Monitor(Protocol):
    name: str

    def observe(self, row: dict[str, float]) -> str | None: ...


@dataclass
class LikelihoodDisplacement:
    """Fires when logps/chosen has fallen ``min_drop`` nats below its first value while the margin
    has grown ``min_margin_gain`` above its first value."""

    min_drop: float = 1.0
    min_margin_gain: float = 0.1
    name: str = "likelihood_displacement"
    first: dict[str, float] = field(default_factory=dict)

    def observe(self, row: dict[str, float]) -> str | None:
        if "logps/chosen" not in row or "rewards/margins" not in row:
            return None
        self.first.setdefault("logp", row["logps/chosen"])
        self.first.setdefault("margin", row["rewards/margins"])
        drop = self.first["logp"] - row["logps/chosen"]
        gain = row["rewards/margins"] - self.first["margin"]
        if drop >= self.min_drop and gain >= self.min_margin_gain:
            return (f"the chosen log-prob fell by {drop:.2f} nats while the reward margin grew by "
                    f"{gain:.3f}: likelihood displacement. It is common in DPO (the loss only asks the "
                    "chosen response to rise relative to the rejected one, and both can fall) and is bounded "
                    "by an SFT term (loss: {sigmoid: 1.0, sft: 0.2}, as in RPO), a smaller learning rate, or "
                    "a DPOP-style penalty on the chosen log-ratio (see losses/constraints.py).")
        return None


@dataclass
class Overfitting:
    """Fires when held-out accuracy has not exceeded its best for ``patience`` evaluations while the
    training side kept improving since that best: accuracy up by ``min_train_gain`` or the margin
    up by ``min_margin_gain`` (accuracy saturates at 1 on memorised pairs; the margin keeps growing)."""

    patience: int = 2
    min_train_gain: float = 0.02
    min_margin_gain: float = 0.5
    name: str = "overfitting"
    best_eval: float = -math.inf
    since_best: int = 0
    train_at_best: tuple[float, float] = (0.0, 0.0)
    train_last: tuple[float, float] = (0.0, 0.0)

    def observe(self, row: dict[str, float]) -> str | None:
        if "rewards/accuracies" in row and "rewards/margins" in row:
            self.train_last = (row["rewards/accuracies"], row["rewards/margins"])
        if "eval/rewards/accuracies" not in row:
            return None
        acc = row["eval/rewards/accuracies"]
        if acc > self.best_eval + 1e-9:
            self.best_eval, self.since_best, self.train_at_best = acc, 0, self.train_last
            return None
        self.since_best += 1
        acc_gain = self.train_last[0] - self.train_at_best[0]
        margin_gain = self.train_last[1] - self.train_at_best[1]
        if self.since_best >= self.patience and (acc_gain >= self.min_train_gain
                                                 or margin_gain >= self.min_margin_gain):
            return (f"held-out accuracy has not improved on {self.best_eval:.3f} for {self.since_best} "
                    f"evaluations while training kept improving (accuracy {acc_gain:+.3f}, margin "
                    f"{margin_gain:+.2f}): the policy is memorising its training pairs (typical from the "
                    "second epoch on). Train fewer epochs, add pairs, or raise beta; the best held-out point "
                    "is the checkpoint to keep.")
        return None


@dataclass
class LengthDrift:
    """Fires when the generation length differs from its first value by more than ``tolerance``."""

    tolerance: float = 0.3
    keys: tuple[str, ...] = ("rollout/length", "eval/generation_length")
    name: str = "length_drift"
    first: float | None = None

    def observe(self, row: dict[str, float]) -> str | None:
        value = next((row[k] for k in self.keys if k in row), None)
        if value is None:
            return None
        if self.first is None:
            self.first = value
            return None
        change = value / max(self.first, 1e-9) - 1
        if abs(change) > self.tolerance:
            way = "longer" if change > 0 else "shorter"
            return (f"generations are {abs(change):.0%} {way} than at the start ({self.first:.1f} -> "
                    f"{value:.1f} tokens): the policy may be exploiting length rather than quality (judges "
                    "and reward models often prefer longer answers). Check a length-controlled win rate "
                    "(preftune eval), add a length penalty (PPO: length_penalty), or balance lengths in the "
                    "pairs (preftune inspect).")
        return None


@dataclass
class StuckAtLog2:
    """Fires after ``windows`` training windows with loss == log 2 and margin == 0 (to ``tol``)."""

    windows: int = 3
    tol: float = 1e-4
    name: str = "no_learning"
    count: int = 0

    def observe(self, row: dict[str, float]) -> str | None:
        if "loss" not in row or "rewards/margins" not in row:
            return None
        stuck = abs(row["loss"] - math.log(2)) < self.tol and abs(row["rewards/margins"]) < self.tol
        self.count = self.count + 1 if stuck else 0
        if self.count >= self.windows:
            return (f"the loss has stayed at log 2 = 0.6931 with a zero margin for {self.count} logging "
                    "windows: the policy's log-probs equal the reference's at every step, so nothing is "
                    "learnt. Check that the learning rate is not 0, that trainable parameters exist (LoRA "
                    "targets), and that the reference is not the live policy itself.")
        return None


def default_monitors() -> list[Any]:
    return [LikelihoodDisplacement(), Overfitting(), LengthDrift(), StuckAtLog2()]


class Diagnostics:
    """Runs every monitor on each logged row; each fires at most once."""

    def __init__(self, monitors: Sequence[Any] | None = None):
        self.monitors = list(monitors) if monitors is not None else default_monitors()
        self.fired: set[str] = set()

    def observe(self, row: dict[str, float]) -> list[Diagnosis]:
        out = []
        for monitor in self.monitors:
            if monitor.name in self.fired:
                continue
            message = monitor.observe(row)
            if message is not None:
                self.fired.add(monitor.name)
                out.append(Diagnosis(monitor.name, int(row.get("step", 0)), message))
        return out
