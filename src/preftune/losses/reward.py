"""The Bradley-Terry loss of a reward model, per pair, with soft label p and optional margin m:

    loss = -p * log sigmoid(r(x, y_w) - r(x, y_l) - m) - (1 - p) * log sigmoid(-(r_w - r_l - m))
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, preference: Tensor, margin: Tensor) -> Tensor:
    """Per-pair Bradley-Terry negative log-likelihood, ``[B]`` (formula in the module docstring)."""
    d = chosen - rejected - margin
    return -preference * F.logsigmoid(d) - (1 - preference) * F.logsigmoid(-d)
