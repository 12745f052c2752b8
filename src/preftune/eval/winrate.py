"""Paired comparisons of two models under a judge: win rate, its interval, position swapping, the
length-controlled win rate, and a Bradley-Terry leaderboard over several models. numpy only.

Data: P prompts, K samples per prompt, both models sampled with the same seeds, so the n = P K
samples are paired; arrays are flat and prompt-major (sample n belongs to prompt n // K).

Win rate. Each paired sample gets a preference s_n in [0, 1] that model a beats model b:
    pointwise judge (a reward r):  s = 1[r(a) > r(b)] + 1/2 1[r(a) = r(b)]     (:func:`reward_preferences`)
    pairwise judge J(x, first, second) = P(first better), judged in both orders (position swapping):
                                   s = (J(x, a, b) + 1 - J(x, b, a)) / 2      (:func:`swapped_preferences`)
and W = (1/n) sum_n s_n. A sample counts as a win when s > 1/2, a tie when s = 1/2, a loss otherwise.

Interval: a percentile bootstrap over prompts (clustered): the K samples of one prompt share it and
are not independent, so whole prompts are resampled. Replicate b draws P prompts with replacement
(counts c_bp, seeded numpy); W*_b = sum_n c_{b,p(n)} s_n / sum_n c_{b,p(n)}; the interval at level
1 - alpha is the [alpha/2, 1 - alpha/2] quantiles of W*. ``stderr`` is the cluster standard error
sd_p(m_p) / sqrt(P) of the per-prompt means m_p.

Length control (as length-controlled AlpacaEval, Dubois et al. 2024, 2404.04475): a logistic regression
of the preference on the length difference,
    P(a beats b | d) = sigmoid(theta_0 + theta_1 z),   z = d / sd(d),   d = len(a) - len(b) [tokens],
fitted by maximum likelihood with the fractional targets s (a tie, s = 1/2, is half a win and half a
loss: the same likelihood as two rows with labels 1 and 0 and weights s and 1 - s); then
    LC = sigmoid(theta_0),
the win rate predicted at equal length. z is scaled by sd(d) (ddof = 1) but not centred, so z = 0
is equal length. AlpacaEval passes z through tanh and adds per-instruction terms; here z enters
linearly and there are no instruction terms. The fit is Newton's method (IRLS) with a ridge
``l2 * sum(w) * theta_1^2 / 2`` on the slope only (1e-4: negligible, but keeps the fit finite
when the length separates the preferences). Its interval reuses the bootstrap replicates (refitted
on each, vectorised over replicates).

Leaderboard: every pair of models (i, j) compared on the same samples adds sum_n s_n wins of i over j
and sum_n (1 - s_n) of j over i (ties split); :func:`~preftune.eval.bradley_terry.fit_bradley_terry`
gives strengths and Wald intervals (which treat each judgment as an independent game).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Leaderboard", "LeaderboardRow", "LengthControl", "WinRate", "bootstrap_counts", "compare",
           "fit_leaderboard", "length_controlled", "logistic_fit", "reward_preferences",
           "swapped_preferences", "win_table"]


def reward_preferences(reward_a: Sequence[float], reward_b: Sequence[float]) -> np.ndarray:
    """``[n]`` s = 1[r_a > r_b] + 1/2 1[r_a = r_b] of paired rewards."""
    a, b = np.asarray(reward_a, dtype=float), np.asarray(reward_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need paired, non-empty rewards, got shapes {a.shape} and {b.shape}")
    return (a > b) + 0.5 * (a == b)


@dataclass(frozen=True)
class Swapped:
    """A pairwise judge's verdicts in both orders: ``preference`` [n] = (p_ab + 1 - p_ba) / 2;
    ``agreement`` = share of samples where both orders pick the same winner (or both call a tie);
    ``first_position_rate`` = mean (p_ab + p_ba) / 2, the judge's preference for whatever is shown
    first (1/2 = no position bias)."""

    preference: np.ndarray
    agreement: float
    first_position_rate: float


def swapped_preferences(p_ab: Sequence[float], p_ba: Sequence[float]) -> Swapped:
    """Combine J(x, a, b) and J(x, b, a) (each P(first better), in [0, 1]); see :class:`Swapped`."""
    ab, ba = np.asarray(p_ab, dtype=float), np.asarray(p_ba, dtype=float)
    if ab.shape != ba.shape or ab.ndim != 1 or ab.size == 0:
        raise ValueError(f"need paired, non-empty judgments, got shapes {ab.shape} and {ba.shape}")
    if not (np.isfinite(ab).all() and np.isfinite(ba).all()) or (np.minimum(ab, ba) < 0).any() or (
            np.maximum(ab, ba) > 1).any():
        raise ValueError("a pairwise judge must return probabilities in [0, 1]")
    agree = np.sign(ab - 0.5) == np.sign(0.5 - ba)  # the winner in a-vs-b terms, in each order
    return Swapped((ab + 1.0 - ba) / 2.0, float(agree.mean()), float(((ab + ba) / 2.0).mean()))


def bootstrap_counts(num_prompts: int, num_boot: int, seed: int) -> np.ndarray:
    """``[B, P]`` how often each prompt is drawn in each of B resamples of P prompts with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_prompts, np.full(num_prompts, 1.0 / num_prompts), size=num_boot).astype(float)


def _expit(x: np.ndarray | float) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=float)))


def logistic_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *,
                 l2: np.ndarray | float = 0.0, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood logistic regression by Newton's method (IRLS), batched over weight vectors.

    ``x`` [n, d] design, ``y`` [n] targets in [0, 1] (fractional allowed), ``weights`` [n] or [B, n]
    (default 1), ``l2`` [d] or scalar ridge per unit of total weight. Maximises, per weight row w,
        sum_n w_n [y_n log p_n + (1 - y_n) log(1 - p_n)] - sum(w) sum_k l2_k theta_k^2 / 2,
        p_n = sigmoid(x_n . theta),
    with steps theta += H^-1 g, g = X^T w (y - p) - sum(w) l2 theta,
    H = X^T diag(w p (1 - p)) X + sum(w) diag(l2), each step capped at 5 in every coordinate, until the
    step or the gradient (per unit weight) is below ``tol``. Returns theta [d] (or [B, d] for [B, n] weights).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    single = w.ndim == 1
    w = np.atleast_2d(w)
    n, d = x.shape
    if y.shape != (n,) or w.shape[1] != n:
        raise ValueError(f"logistic_fit: x {x.shape}, y {y.shape} and weights {w.shape} do not match")
    ridge = np.broadcast_to(np.asarray(l2, dtype=float), (d,)) * w.sum(1, keepdims=True)  # [B, d]
    theta = np.zeros((w.shape[0], d))
    outer = (x[:, :, None] * x[:, None, :]).reshape(n, d * d)  # [n, d*d] rows x_n x_n^T
    for _ in range(max_iter):
        p = _expit(theta @ x.T)  # [B, n]
        grad = (w * (y - p)) @ x - ridge * theta
        if np.abs(grad).max() <= tol * w.sum(1).max():  # also ends a fit running off to infinity (separation)
            break
        hess = ((w * p * (1.0 - p)) @ outer).reshape(-1, d, d) + ridge[:, :, None] * np.eye(d)
        step = np.linalg.solve(hess + 1e-12 * np.eye(d), grad[:, :, None])[:, :, 0]
        step = np.clip(step, -5.0, 5.0)
        theta += step
        if np.abs(step).max() < tol:
            break
    return theta[0] if single else theta


@dataclass(frozen=True)
class LengthControl:
    """``rate`` = sigmoid(theta_0) and ``slope`` = theta_1 (per sd of the length difference; > 0: the
    judge prefers the longer sample), ``length_sd`` = sd(d) in tokens (0: no length variation, slope 0)."""

    rate: float
    slope: float
    length_sd: float


LC_RIDGE = 1e-4


def _lc_design(length_diff: np.ndarray) -> tuple[np.ndarray, float]:
    sd = float(np.std(length_diff, ddof=1)) if length_diff.size > 1 else 0.0
    z = length_diff / sd if sd > 0 else np.zeros_like(length_diff)
    return np.stack([np.ones_like(z), z], axis=1), sd


def length_controlled(preference: Sequence[float], length_diff: Sequence[float],
                      weights: np.ndarray | None = None) -> LengthControl | np.ndarray:
    """The length-controlled win rate (module docstring): fit sigmoid(theta_0 + theta_1 d / sd(d)) to the
    preferences s [n] and return sigmoid(theta_0). With ``weights`` [B, n] (bootstrap counts per
    sample), returns the [B] rates of the refits instead."""
    s, d = np.asarray(preference, dtype=float), np.asarray(length_diff, dtype=float)
    if s.shape != d.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"need one length difference per preference, got {d.shape} and {s.shape}")
    x, sd = _lc_design(d)
    theta = logistic_fit(x, s, weights, l2=np.array([0.0, LC_RIDGE]))
    if weights is not None and np.asarray(weights).ndim == 2:
        return _expit(theta[:, 0])
    return LengthControl(float(_expit(theta[0])), float(theta[1]), sd)


@dataclass
class WinRate:
    """Model a against model b under one judge (formulas in the module docstring). ``low``/``high``:
    bootstrap interval over prompts at ``level``; ``lc_*``: the length-controlled win rate and its
    bootstrap interval; ``length_slope``: theta_1; ``agreement``/``first_position_rate``: pairwise
    judges only (None for a reward)."""

    rate: float
    low: float
    high: float
    stderr: float
    wins: int
    ties: int
    losses: int
    num_samples: int
    num_prompts: int
    level: float
    lc_rate: float
    lc_low: float
    lc_high: float
    length_slope: float
    agreement: float | None = None
    first_position_rate: float | None = None


def compare(preference: Sequence[float], length_diff: Sequence[float], num_prompts: int, *,
            level: float = 0.95, num_boot: int = 2000, seed: int = 0,
            swapped: Swapped | None = None) -> WinRate:
    """:class:`WinRate` of the preferences s [P K] (prompt-major) with bootstrap intervals over the P
    prompts.

    The same ``seed`` gives the same resampled prompts for every comparison of a run."""
    s, d = np.asarray(preference, dtype=float), np.asarray(length_diff, dtype=float)
    if s.size == 0 or s.size % num_prompts or s.shape != d.shape:
        raise ValueError(f"{s.size} preferences and {d.size} length differences do not split into "
                         f"{num_prompts} prompts")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    k = s.size // num_prompts
    per_prompt = s.reshape(num_prompts, k).mean(1)
    counts = bootstrap_counts(num_prompts, num_boot, seed)  # [B, P]
    boot = counts @ per_prompt / num_prompts
    lc = length_controlled(s, d)
    boot_lc = length_controlled(s, d, np.repeat(counts, k, axis=1))
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    low, high = np.quantile(boot, q)
    lc_low, lc_high = np.quantile(boot_lc, q)
    stderr = float(per_prompt.std(ddof=1) / math.sqrt(num_prompts)) if num_prompts > 1 else 0.0
    return WinRate(float(s.mean()), float(low), float(high), stderr, int((s > 0.5).sum()),
                   int((s == 0.5).sum()), int((s < 0.5).sum()), int(s.size), num_prompts, level, lc.rate,
                   float(lc_low), float(lc_high), lc.slope, swapped.agreement if swapped else None,
                   swapped.first_position_rate if swapped else None)


def win_table(num_players: int, preferences: dict[tuple[int, int], Sequence[float]]) -> np.ndarray:
    """``wins[i, j]`` = sum of s over the comparisons (i, j) (s: P(i beats j) per sample) plus
    sum of 1 - s over the comparisons (j, i)."""
    wins = np.zeros((num_players, num_players))
    for (i, j), s in preferences.items():
        s = np.asarray(s, dtype=float)
        wins[i, j] += s.sum()
        wins[j, i] += (1.0 - s).sum()
    return wins


@dataclass
class LeaderboardRow:
    """One model: ``strength`` a_i / a_baseline with its Wald interval; ``p_beats_baseline`` = a_i / (a_i +
    a_baseline) with its interval; ``wins``/``losses``: judged games (ties split)."""

    rank: int
    name: str
    strength: float
    low: float
    high: float
    p_beats_baseline: float
    p_low: float
    p_high: float
    wins: float
    losses: float


@dataclass
class Leaderboard:
    """Bradley-Terry fit over all models; ``rows`` sorted by strength, strongest first; ``prior`` the
    pseudo-wins added to every ordered pair (0 = plain MLE)."""

    judge: str
    baseline: str
    prior: float
    level: float
    rows: list[LeaderboardRow]
    note: str = ""


def fit_leaderboard(names: Sequence[str], wins: np.ndarray, *, baseline: int = 0, judge: str = "",
                    level: float = 0.95, prior: float = 0.0) -> Leaderboard:
    """Fit Bradley-Terry strengths to ``wins`` [M, M]. When the MLE does not exist (a model never wins or
    never loses) and ``prior`` is 0, refit with one pseudo-win per ordered pair and say so in ``note``."""
    from preftune.eval.bradley_terry import fit_bradley_terry

    note = ""
    try:
        fit = fit_bradley_terry(wins, list(names), prior=prior)
    except ValueError as e:
        if prior > 0:
            raise
        prior = 1.0
        note = f"plain MLE does not exist ({e}); fitted with prior = 1 pseudo-win per ordered pair"
        fit = fit_bradley_terry(wins, list(names), prior=prior)
    base = names[baseline]
    rows = []
    for rank, name in enumerate(fit.ranking(), 1):
        k = fit.names.index(name)
        low, high = fit.ratio_interval(name, base, level)
        p_low, p_high = fit.prob_interval(name, base, level)
        rows.append(LeaderboardRow(rank, name, float(fit.strengths[k] / fit.strengths[baseline]), low, high,
                                   fit.prob(name, base), p_low, p_high, float(wins[k].sum()),
                                   float(wins[:, k].sum())))
    return Leaderboard(judge, base, prior, level, rows, note)
