"""Per-pair training and evaluation metrics of preference objectives."""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, SequenceLogps


def preference_metrics(out: LossOutput, policy: SequenceLogps) -> dict[str, Tensor]:
    """Detached ``[B]`` metrics; the loop averages them over pairs.

    rewards/chosen, rewards/rejected: implicit rewards r = beta * log(pi / pi_ref);
    rewards/margins = r_w - r_l; rewards/accuracies = [r_w > r_l];
    dpo/grad_weight = sigmoid(r_l - r_w), the weight DPO's gradient gives each pair;
    logps/chosen, logps/rejected: summed completion log-probs under the policy.
    """
    margin = out.chosen_reward - out.rejected_reward
    metrics = {
        "rewards/chosen": out.chosen_reward,
        "rewards/rejected": out.rejected_reward,
        "rewards/margins": margin,
        "rewards/accuracies": (margin > 0).float(),
        "dpo/grad_weight": torch.sigmoid(-margin),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }
    # loss-specific extras; batch-level scalars (e.g. KTO's KL estimate) are repeated per pair
    metrics.update({k: v.detach().expand_as(margin) for k, v in out.metrics.items()})
    return metrics
