"""Likely label flips and the flip rate, from a model's margins m_i (see :mod:`preftune.doctor.scoring`).

Model. A fraction e of the labels is flipped independently of the content (a swapped pair, a buggy
score). Let f be the density of m on correctly labelled pairs; flipping a pair negates its margin,
so the observed margins have the mirror-mixture density

    g(m) = (1 - e) f(m) + e f(-m).

Estimate (``rate``): f = N(mu, s^2), mu >= 0, fitted with e by EM. E-step, the posterior flip
probability of each pair, P(flip | m_i) = r_i = e N(m_i; -mu, s) / g(m_i); M-step e = mean(r),
mu = mean((1 - 2 r_i) m_i), s^2 = mean((1 - r_i)(m_i - mu)^2 + r_i (m_i + mu)^2). The model's own
errors on clean pairs are the left tail of N(mu, s), so they are not counted as flips. When the
model barely separates the labels (``separation`` mu / s < 0.5) the two components overlap and e
is not identifiable: the estimate is reported but no setting is suggested. The interval is Wilson's
for sum(r) out of n (sampling error only).

Cross-check without the normal shape (``confident_share``): for t > 0 let u = P_f(m < -t),
v = P_f(m > t); then P(m < -t) = (1 - e) u + e v and P(|m| > t) = u + v, so

    N(m < -t) / N(|m| > t) = e + (1 - 2e) u / (u + v),

an estimate biased up by the model's confident error rate u / (u + v) on clean pairs; t is the
median of |m| (the more confident half), whatever the scale of m.

Flagged rows: r_i >= 1/2, most negative margin first. Suggested setting: robust DPO
(``loss: robust``, Chowdhury et al. 2024) or cDPO (``loss: sigmoid``) with
``loss_params.label_smoothing = rate``, when rate >= 0.02.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from preftune.doctor.stats import quantiles, wilson_interval

MIN_RATE = 0.02
MIN_SEPARATION = 0.5


def mirror_mixture(
    m: np.ndarray, *, max_iter: int = 500, tol: float = 1e-9
) -> tuple[float, float, float, np.ndarray]:
    """EM fit of g(m) = (1 - e) N(mu, s) + e N(-mu, s): returns (e, mu, s, r) with r the per-pair
    posterior flip probabilities (module docstring)."""
    m = np.asarray(m, dtype=float)
    mu, s, e = float(np.abs(m).mean()), float(m.std()) or 1.0, 0.1
    r = np.zeros_like(m)
    for _ in range(max_iter):
        s2 = max(s * s, 1e-12)
        log_odds = np.log(e) - np.log1p(-e) - 2 * mu * m / s2  # log [e N(m; -mu, s) / ((1 - e) N(m; mu, s))]
        r = 0.5 * (1 + np.tanh(0.5 * np.clip(log_odds, -500, 500)))
        e_new = float(np.clip(r.mean(), 1e-6, 0.5))
        mu = max(float(((1 - 2 * r) * m).mean()), 0.0)
        s = float(np.sqrt(((1 - r) * (m - mu) ** 2 + r * (m + mu) ** 2).mean())) or 1e-6
        done = abs(e_new - e) < tol
        e = e_new
        if done:
            break
    return e, mu, s, r


def estimate_flips(
    rows: Sequence[int], margins: Sequence[float], threshold: float | None = None
) -> dict[str, Any]:
    """Flip-rate estimates, interval and flagged rows (module docstring); NaN margins are skipped.
    ``threshold`` overrides t of the confident-share cross-check."""
    m = np.asarray(margins, dtype=float)
    rows_arr = np.asarray(rows)
    ok = ~np.isnan(m)
    m, rows_arr = m[ok], rows_arr[ok]
    n = len(m)
    if n == 0:
        return {"scored": 0}
    e, mu, s, r = mirror_mixture(m)
    t = float(np.median(np.abs(m))) if threshold is None else float(threshold)
    confident, negative = int((np.abs(m) > t).sum()), int((m < -t).sum())
    flagged = np.flatnonzero(r >= 0.5)
    flagged = flagged[np.argsort(m[flagged], kind="stable")]
    separation = mu / s if s > 0 else 0.0
    suggestion = None
    if e >= MIN_RATE and separation >= MIN_SEPARATION:
        suggestion = {"loss": "robust", "loss_params.label_smoothing": round(min(e, 0.49), 3)}
    return {
        "scored": n,
        "agreement": float((m > 0).mean() + 0.5 * (m == 0).mean()),
        "margins": quantiles(m),
        "rate": e,
        "interval": list(wilson_interval(round(float(r.sum())), n)),
        "clean_margin": {"mean": mu, "sd": s},
        "separation": separation,
        "identifiable": separation >= MIN_SEPARATION,
        "confident_share": {
            "threshold": t,
            "confident": confident,
            "negative": negative,
            "rate": negative / confident if confident else 0.0,
        },
        "flagged": {
            "count": len(flagged),
            "rows": [int(x) for x in rows_arr[flagged]],
            "margins": [float(x) for x in m[flagged]],
            "p_flip": [round(float(x), 4) for x in r[flagged]],
        },
        "suggestion": suggestion,
    }
