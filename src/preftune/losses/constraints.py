"""How to add your own penalty term: it is just another registered loss, combined by weight.

A constraint is a pure function of :class:`~preftune.losses.base.LossInputs` returning a
per-pair loss ``[B]`` (differentiable) and detached rewards ``[B]`` (zeros when it defines
none). Register it under a name; its keyword-only parameters become hyperparameters, shared
by name with the other selected losses (so pick distinctive names)::

    import torch
    from preftune.losses import LossInputs, LossOutput, register_loss
    from preftune.losses.base import zeros_like_reward

    @register_loss("rejected_floor", ranges={"floor": "< 0"})   # needs_reference=True is the default
    def rejected_floor(inputs: LossInputs, *, floor: float = -5.0) -> LossOutput:
        _, rejected_ratio = inputs.logratios()
        loss = torch.relu(floor - rejected_ratio) ** 2      # [B]
        return LossOutput(loss, zeros_like_reward(loss), zeros_like_reward(loss))

Import that module before the config is validated (registration happens at import), then
select it next to the main objective with a weight:

    loss: {sigmoid: 1.0, rejected_floor: 0.05}       # in the YAML config
    loss_params: {beta: 0.1, floor: -8.0}

or from Python: ``PreferenceLoss({"sigmoid": 1.0, "rejected_floor": 0.05}, {"beta": 0.1})``.
The objective is sum_k weight_k * loss_k, averaged over pairs by the caller. Rewards and the
logged DPO gradient weight come from the first loss listed, so list the constraint after the
objective. Use ``register_loss(name, needs_reference=False)`` when the term reads only
``inputs.policy`` (then it adds no reference model of its own), and ``data="unpaired"`` for
terms meant to sit next to KTO. The module below is a working example of exactly this.
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossInputs, LossOutput, register_loss, zeros_like_reward
from preftune.losses.dpo import mean_logratios


@register_loss("chosen_logratio_l2", ranges={"l2_tolerance": ">= 0"})
def chosen_logratio_l2(inputs: LossInputs, *, l2_tolerance: float = 0.0) -> LossOutput:
    """Keep the chosen completion's per-token log-ratio near the reference (an L2 trust region).

    a = |log pi(y_w) - log pi_ref(y_w)| / n_w                                       [B]
    loss = relu(a - l2_tolerance)^2                                                  [B]

    Zero inside the tolerance band; counters the drift of the chosen likelihood that DPO
    allows (it only constrains the margin). Use as ``{sigmoid: 1.0, chosen_logratio_l2: 0.1}``.
    Rewards: zeros (it defines none).
    """
    chosen_mean, _ = mean_logratios(inputs)
    loss = torch.relu(chosen_mean.abs() - l2_tolerance) ** 2
    return LossOutput(loss, zeros_like_reward(loss), zeros_like_reward(loss))
