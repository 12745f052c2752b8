"""Preference losses: a registry of small pure functions (see :mod:`preftune.losses.base`)."""

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
