"""Measuring a reward-vs-KL frontier: one point per trained (or sampled) policy pi.

Each point places a policy at x = KL(pi || pi_ref) per sequence [nats] and y = mean ground-truth
reward r*(x, y) of its samples on held-out prompts, both with standard errors, together with the
compute it cost. A method's Pareto frontier is the set of its points that no other point of the
same method beats on both axes (less or equal KL and greater or equal reward, one strictly).

Best-of-N sampling from pi_ref needs no training: its KL is known analytically
(:func:`best_of_n_kl`) and its reward is read off a matrix of scored candidates
(:func:`best_of_n_rewards`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "FrontierPoint",
    "best_of_n_kl",
    "best_of_n_rewards",
    "pareto_frontier",
    "read_points_jsonl",
    "write_points_jsonl",
]


@dataclass
class FrontierPoint:
    """One run on the reward-vs-KL plane.

    ``reward`` = mean r* of the policy's held-out samples, ``kl`` = mean of log pi(y|x) - log pi_ref(y|x)
    over samples y ~ pi (per sequence, nats), ``kl_per_token`` = summed log-ratio / summed tokens;
    ``*_stderr`` = s / sqrt(n). ``win_rate``: P(r*(y_pi) > r*(y_ref)) + 1/2 P(tie), or None when not
    measured. ``train_tokens``: tokens through forward + backward passes during training (0 for
    best-of-N); ``sample_tokens``: tokens generated for anything the method needed (training data,
    rollouts, best-of-N candidates). ``extra``: method-specific scalars (e.g. final loss).
    """

    method: str  # "DPO", "IPO", "PPO (oracle reward)", "PPO (reward model)", "preferred-FT", "best-of-N"
    setting: str  # the knob that varies along the method's curve, e.g. "beta=0.1", "N=8"
    reward: float
    reward_stderr: float
    kl: float
    kl_stderr: float
    kl_per_token: float
    win_rate: float | None
    train_tokens: int
    sample_tokens: int
    wall_time_s: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrontierPoint:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``TypeError``."""
        data = dict(data)
        data["extra"] = {k: float(v) for k, v in data.get("extra", {}).items()}
        return cls(**data)


def write_points_jsonl(points: Iterable[FrontierPoint], path: str | Path) -> Path:
    """One JSON object per line, one line per point."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for p in points:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_points_jsonl(path: str | Path) -> list[FrontierPoint]:
    """Inverse of :func:`write_points_jsonl` (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [FrontierPoint.from_dict(json.loads(line)) for line in f if line.strip()]


def pareto_frontier(points: Sequence[FrontierPoint], method: str | None = None) -> list[FrontierPoint]:
    """The points of one method that no other point of it dominates, sorted by KL (then reward).

    q dominates p iff q.kl <= p.kl and q.reward >= p.reward with at least one strict; so of two points
    with equal KL only the higher reward survives, and exact duplicates both survive. Points with a
    non-finite KL or reward are never on the frontier. ``method`` selects the method's points from
    ``points``; without it all points must share one method (``ValueError`` otherwise).
    """
    if method is None:
        methods = {p.method for p in points}
        if len(methods) > 1:
            raise ValueError(f"pareto_frontier: points of several methods {sorted(methods)}; pass method=")
    else:
        points = [p for p in points if p.method == method]
    finite = [p for p in points if math.isfinite(p.kl) and math.isfinite(p.reward)]

    def dominated(p: FrontierPoint) -> bool:
        return any(q.kl <= p.kl and q.reward >= p.reward and (q.kl < p.kl or q.reward > p.reward)
                   for q in finite)

    return sorted((p for p in finite if not dominated(p)), key=lambda p: (p.kl, p.reward))


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) = log n - (n - 1) / n nats, for best-of-n sampling from pi_ref.

    Exact when the n candidates are almost surely distinct and the selection score has no ties
    (continuous distribution of the score over samples), as for long sampled sequences; with repeated
    samples the true KL is smaller, so this is an upper bound (Stiennon et al. 2020; Hilton & Gao's
    note on the KL of best-of-n; Beirami et al. 2024). n = 1 gives 0.
    """
    if n < 1:
        raise ValueError(f"best_of_n_kl: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def _as_array(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)


def best_of_n_rewards(proxy: Tensor | np.ndarray, true: Tensor | np.ndarray,
                      ns: Sequence[int]) -> dict[int, np.ndarray]:
    """Ground-truth reward of best-of-n under a proxy score, for each n in ``ns``.

    ``proxy``, ``true``: ``[P, M]``, M scored candidates y_1..y_M ~ pi_ref per prompt. For prompt i,
    best-of-n picks j* = argmax_{j < n} proxy[i, j] (ties: the first such j) and scores it
    ``true[i, j*]``; using the first n candidates makes the n's nested. Returns {n: ``[P]``} float64.
    ``ValueError`` for n < 1, n > M, mismatched or non-2-D shapes, or a NaN proxy score.
    """
    p, t = _as_array(proxy), _as_array(true)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"best_of_n_rewards: proxy and true must be [P, M] of one shape, got "
                         f"{p.shape} and {t.shape}")
    if np.isnan(p).any():
        raise ValueError("best_of_n_rewards: proxy scores contain NaN")
    m = p.shape[1]
    bad = [n for n in ns if not 1 <= n <= m]
    if bad:
        raise ValueError(f"best_of_n_rewards: every n must satisfy 1 <= n <= M = {m} candidates, got {bad}")
    rows = np.arange(p.shape[0])
    return {int(n): t[rows, np.argmax(p[:, :n], axis=1)] for n in ns}


