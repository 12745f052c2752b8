"""Small statistics used by the doctor: length bias, binomial intervals, histograms."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def length_bias(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """How strongly 'longer' predicts 'chosen', from per-pair lengths L_w (chosen) and L_l (rejected).

    With D = L_w - L_l over the n pairs:

    * ``share_chosen_longer`` = P(D > 0), ``share_equal`` = P(D = 0);
    * ``longer_rule_accuracy`` = P(D > 0) + P(D = 0) / 2: how often "prefer the longer reply" agrees
      with the label (1/2 = no bias);
    * ``mean_diff`` = mean(D), ``median_diff``;
    * ``cohens_d`` = mean(D) / s_p with s_p = sqrt((s_w^2 + s_l^2) / 2), the two-group effect size
      (0.2 small, 0.5 medium, 0.8 large);
    * ``cohens_dz`` = mean(D) / sd(D), the paired effect size.
    """
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    n = len(c)
    if n == 0:
        return {"pairs": 0}
    d = c - r
    out = {
        "pairs": n,
        "mean_chosen": float(c.mean()),
        "mean_rejected": float(r.mean()),
        "share_chosen_longer": float((d > 0).mean()),
        "share_equal": float((d == 0).mean()),
        "longer_rule_accuracy": float((d > 0).mean() + 0.5 * (d == 0).mean()),
        "mean_diff": float(d.mean()),
        "median_diff": float(np.median(d)),
        "cohens_d": 0.0,
        "cohens_dz": 0.0,
    }
    if n > 1:
        pooled = math.sqrt((c.var(ddof=1) + r.var(ddof=1)) / 2)
        sd = d.std(ddof=1)
        out["cohens_d"] = float(d.mean() / pooled) if pooled > 0 else 0.0
        out["cohens_dz"] = float(d.mean() / sd) if sd > 0 else 0.0
    return out


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def quantiles(values: np.ndarray) -> dict[str, float]:
    """min, median, p90, p99, max and mean of a sample (empty: {})."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {}
    q = np.quantile(v, [0.0, 0.5, 0.9, 0.99, 1.0])
    return {
        "mean": float(v.mean()),
        "min": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "p99": float(q[3]),
        "max": float(q[4]),
    }
