"""KTO: prospect-theoretic optimisation on unpaired, binary-labelled completions.

Registered with ``data="unpaired"``: row i of the batch is one labelled completion, not a pair.
As :class:`~preftune.losses.base.SequenceLogps` documents for unpaired data, ``chosen[i]`` is
log pi(y_i | x_i) of the labelled completion and ``rejected[i]`` is log pi(y_{i+1} | x_i), a
mismatched completion used only for the KL reference point; ``preference[i]`` is 1.0 for a
desirable completion and 0.0 for an undesirable one.
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossInputs, LossOutput, register_loss


@register_loss("kto", data="unpaired")
def kto(
    inputs: LossInputs,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7), as TRL's KTOTrainer computes it.

    r_i = log pi(y_i | x_i) - log pi_ref(y_i | x_i)                                  [B]
    z0 = max(0, mean_i (log pi(y_{i+1} | x_i) - log pi_ref(y_{i+1} | x_i)))   (detached scalar)
    desirable rows:   loss = desirable_weight   * (1 - sigmoid(beta * (r_i - z0)))   [B]
    undesirable rows: loss = undesirable_weight * (1 - sigmoid(beta * (z0 - r_i)))   [B]

    Rows with preference > 0.5 are desirable. Rewards: beta * r_i in ``chosen_reward`` for
    desirable rows and in ``rejected_reward`` for undesirable rows, zero elsewhere.
    Metric ``kl``: the estimate z0 (a scalar). Difference from TRL: with several processes TRL
    averages z0 across them; here z0 is the mean of the local batch.
    """
    ref = inputs.ref()
    ratio = inputs.policy.chosen - ref.chosen
    kl = (inputs.policy.rejected - ref.rejected).mean().clamp(min=0).detach()
    desirable = inputs.preference > 0.5
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    reward = (beta * ratio).detach()
    zero = torch.zeros_like(reward)
    return LossOutput(loss, torch.where(desirable, reward, zero), torch.where(desirable, zero, reward),
                      {"kl": kl})
