"""Preference losses: a registry of small pure functions (see :mod:`preftune.losses.base`), the
Bradley-Terry loss of reward models (``reward.py``), PPO's math (``ppo.py``) and the metrics each kind
of loss logs (``metrics.py``).

Layer rule: imports only ``data`` (the batch types) and the leaves. A new loss is one function
registered in a module here; nothing else changes.
"""

# importing a module registers its losses
from preftune.losses import (  # noqa: F401
    constraints,
    dpo,
    ipo,
    kto,
    pairwise,
    reference_free,
)
from preftune.losses.base import (
    LOSSES,
    LossInputs,
    LossOutput,
    SequenceLogps,
    get_loss,
    register_loss,
)
from preftune.losses.objective import PreferenceLoss

__all__ = [
    "LOSSES",
    "LossInputs",
    "LossOutput",
    "PreferenceLoss",
    "SequenceLogps",
    "get_loss",
    "register_loss",
]
