"""Small statistics shared by the layers (a leaf: imports no preftune module)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(n), s with ddof = 1 (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("mean_stderr: no values")
    stderr = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), stderr
