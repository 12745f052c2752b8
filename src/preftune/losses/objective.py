"""A weighted sum of registered losses, validated against their signatures."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.losses.base import LossInputs, LossOutput, LossSpec, SequenceLogps, get_loss


@dataclass(frozen=True)
class PreferenceLoss:
    """``loss = sum_k weight_k * loss_k(inputs; params)``, averaged over pairs by the caller.

    ``weights`` maps registered loss names to weights, e.g. ``{"sigmoid": 1.0, "sft": 0.2}``.
    ``params`` holds hyperparameters shared by name (``beta`` is used by every loss that takes
    it). Construction fails on an unknown loss, a missing required hyperparameter, a
    hyperparameter no selected loss accepts, or losses that need different kinds of data.
    Rewards and the DPO gradient weight come from the first loss listed.
    """

    weights: Mapping[str, float]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("loss: at least one loss must be selected")
        specs = [get_loss(name) for name in self.weights]
        accepted = {p for s in specs for p in s.params}
        for key in self.params:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"loss parameter {key!r} is not used by the selected loss(es) "
                    f"{', '.join(self.weights)}{hint}"
                )
        for s in specs:
            missing = [p for p in s.required if p not in self.params]
            if missing:
                raise ValueError(f"loss {s.name!r} needs {', '.join(missing)} (set it under loss_params)")
        self._check_ranges(specs)
        kinds = {s.data for s in specs}
        if len(kinds) > 1:
            raise ValueError(f"losses {', '.join(self.weights)} mix paired and unpaired data")
        self._dry_run()

    def _check_ranges(self, specs: list[LossSpec]) -> None:
        """Each given hyperparameter against the range each selected loss taking it declares."""
        for s in specs:
            for key in s.params:
                allowed = s.range_of(key)
                if key in self.params and allowed is not None and not allowed.contains(self.params[key]):
                    which = f" for loss {s.name!r}" if len(specs) > 1 else ""
                    raise ValueError(f"config: loss_params.{key} must be {allowed.describe()}{which}, "
                                     f"got {self.params[key]!r}")

    def _dry_run(self) -> None:
        """Call every loss once on a two-pair dummy batch, so a loss that fails with these
        hyperparameters (a user's registered loss may check its own) fails while the config is read,
        not mid-training. The declared ranges are checked once, by :meth:`_check_ranges`."""
        zeros = torch.zeros(2)
        logps = SequenceLogps(zeros - 1.0, zeros - 2.0, zeros + 1.0, zeros + 1.0)
        self(LossInputs(logps, logps if self.needs_reference else None, torch.ones(2)))

    @property
    def specs(self) -> list[LossSpec]:
        return [get_loss(name) for name in self.weights]

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.specs)

    @property
    def data_kind(self) -> str:
        return self.specs[0].data

    def __call__(self, inputs: LossInputs) -> LossOutput:
        total = None
        first: LossOutput | None = None
        metrics: dict[str, torch.Tensor] = {}
        for spec, weight in zip(self.specs, self.weights.values()):
            kwargs = {k: v for k, v in self.params.items() if k in spec.params}
            out = spec.fn(inputs, **kwargs)
            first = first or out
            total = weight * out.loss if total is None else total + weight * out.loss
            if len(self.weights) > 1:
                metrics[f"loss/{spec.name}"] = out.loss.detach()
            metrics.update(out.metrics)
        assert first is not None and total is not None
        return LossOutput(total, first.chosen_reward, first.rejected_reward, metrics)
