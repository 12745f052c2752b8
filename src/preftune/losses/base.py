"""The loss contract and registry.

Every preference objective is one small pure function

    loss_fn(inputs: LossInputs, **params) -> LossOutput

registered by name with :func:`register_loss`. Its keyword-only parameters are its
hyperparameters (``beta``, ``label_smoothing``, ``gamma`` ...); a parameter without a
default is required. The registry reads the signature, so the config layer can reject an
unknown name, a missing hyperparameter or an option no selected loss uses, before training.
Each hyperparameter's range (:class:`Range`: ``beta > 0``, ``label_smoothing in [0, 0.5)``) is
declared with the loss (``register_loss(..., ranges=...)``) or, for names many losses share, in
:data:`SHARED_RANGES`; the config checks it before anything loads.

Shapes: ``B`` pairs per batch. All tensors of ``SequenceLogps`` are ``[B]``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

DataKind = Literal["paired", "unpaired"]


@dataclass(frozen=True)
class SequenceLogps:
    """Summed log-probs of completion tokens, one value per sequence.

    For paired data, ``chosen[i]`` = log pi(y_w^i | x^i) and ``rejected[i]`` = log pi(y_l^i | x^i).
    For unpaired (KTO) data, ``chosen[i]`` = log pi(y_i | x_i) (the labelled completion) and
    ``rejected[i]`` = log pi(y_{i+1} | x_i) (a mismatched completion, used for the KL reference point).
    ``*_tokens`` count the scored completion tokens (float, for averaging). All shapes ``[B]``.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    @property
    def chosen_mean(self) -> Tensor:
        """Average per-token log-prob of the chosen completion, ``[B]``."""
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> Tensor:
        """Average per-token log-prob of the rejected completion, ``[B]``."""
        return self.rejected / self.rejected_tokens.clamp(min=1)

    def detach(self) -> SequenceLogps:
        return SequenceLogps(
            self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens
        )


@dataclass(frozen=True)
class LossInputs:
    """What a loss sees.

    policy:     log-probs under pi_theta (with grad).
    reference:  log-probs under pi_ref (no grad); ``None`` for reference-free losses.
    preference: ``[B]`` probability that chosen beats rejected (soft label, default 1).
                For unpaired data: 1.0 for a desirable completion, 0.0 for an undesirable one.
    """

    policy: SequenceLogps
    reference: SequenceLogps | None
    preference: Tensor

    def ref(self) -> SequenceLogps:
        """The reference log-probs; a clear error for a loss that needs them but got none."""
        if self.reference is None:
            raise ValueError("this loss needs reference log-probs, but none were computed")
        return self.reference

    def logratios(self) -> tuple[Tensor, Tensor]:
        """``(log pi/pi_ref (y_w), log pi/pi_ref (y_l))``, each ``[B]``."""
        ref = self.ref()
        return self.policy.chosen - ref.chosen, self.policy.rejected - ref.rejected


@dataclass(frozen=True)
class LossOutput:
    """Per-pair loss (``[B]``, differentiable) and detached implicit rewards (``[B]``)."""

    loss: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


LossFn = Callable[..., LossOutput]
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


@dataclass(frozen=True)
class Range:
    """The values a hyperparameter accepts, written as it reads: ``"> 0"``, ``">= 0"``, ``"[0, 0.5)"``,
    ``"(0, 1)"`` or ``"any"`` (any finite number)."""

    text: str

    def __post_init__(self) -> None:
        if self.text != "any" and not (_INTERVAL.match(self.text) or _BOUND.match(self.text)):
            raise ValueError(f"range {self.text!r}: write '> 0', '>= 0', '[0, 0.5)', '(0, 1)' or 'any'")

    def contains(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if (m := _INTERVAL.match(self.text)) is not None:
            lo, hi = float(m[2]), float(m[3])
            above = lo <= value if m[1] == "[" else lo < value
            return above and (value <= hi if m[4] == "]" else value < hi)
        if (m := _BOUND.match(self.text)) is not None:
            op, bound = m[1], float(m[2])
            return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
        return True

    def describe(self) -> str:
        if self.text == "any":
            return "a finite number"
        return f"in {self.text}" if self.text[0] in "[(" else self.text


# ranges of hyperparameters that many losses share by name; a loss's own ``ranges=`` overrides them
SHARED_RANGES: dict[str, Range] = {
    "beta": Range("> 0"),
    "label_smoothing": Range("[0, 0.5)"),  # cDPO / robust: 0.5 makes the label a coin flip
    "gamma": Range(">= 0"),
    "desirable_weight": Range("> 0"),  # KTO (losses/kto.py)
    "undesirable_weight": Range("> 0"),
}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function, what it needs, and the range of each hyperparameter."""

    name: str
    fn: LossFn
    needs_reference: bool
    data: DataKind
    required: tuple[str, ...]
    optional: dict[str, object]
    ranges: Mapping[str, Range] = field(default_factory=dict)

    @property
    def params(self) -> tuple[str, ...]:
        return self.required + tuple(self.optional)

    def range_of(self, param: str) -> Range | None:
        return self.ranges.get(param) or SHARED_RANGES.get(param)


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, *, needs_reference: bool = True, data: DataKind = "paired",
    ranges: Mapping[str, str] | None = None,
) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` under ``name``. Its keyword-only parameters become its hyperparameters;
    ``ranges`` maps a parameter to the values it accepts (see :class:`Range`), checked with the config.

    Users add their own objectives and constraint terms the same way::

        @register_loss("length_penalty", needs_reference=False, ranges={"max_tokens": "> 0"})
        def length_penalty(inputs: LossInputs, *, max_tokens: float = 64.0) -> LossOutput: ...

    and select them in the config as ``loss: {sigmoid: 1.0, length_penalty: 0.1}``.
    """

    def decorate(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        required: list[str] = []
        optional: dict[str, object] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
            else:
                optional[p.name] = p.default
        unknown = set(ranges or {}) - set(required) - set(optional)
        if unknown:
            raise ValueError(f"loss {name!r}: ranges for parameters it does not take: "
                             f"{', '.join(sorted(unknown))}")
        declared = {k: Range(v) for k, v in (ranges or {}).items()}
        LOSSES[name] = LossSpec(name, fn, needs_reference, data, tuple(required), optional, declared)
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    """Look up a registered loss; unknown names get a suggestion."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def zeros_like_reward(x: Tensor) -> Tensor:
    """Rewards for losses that define none: zeros ``[B]``."""
    return torch.zeros_like(x).detach()
