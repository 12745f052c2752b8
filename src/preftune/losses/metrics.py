"""Per-item training and evaluation metrics of preference objectives, one set per kind of loss:
each name means what it says for the loss it is logged for."""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, SequenceLogps

# losses whose per-pair gradient is weighted by sigmoid(r_l - r_w) (DPO's logistic loss)
GRAD_WEIGHT_LOSSES = frozenset({"sigmoid"})
UNPAIRED_CLASSES = ("desirable", "undesirable")


def preference_metrics(out: LossOutput, policy: SequenceLogps, *,
                       first_loss: str = "sigmoid") -> dict[str, Tensor]:
    """Detached ``[B]`` metrics of a paired loss; the loop averages them over pairs.

    rewards/chosen, rewards/rejected: implicit rewards r = beta * log(pi / pi_ref);
    rewards/margins = r_w - r_l; rewards/accuracies = [r_w > r_l];
    dpo/grad_weight = sigmoid(r_l - r_w), the weight DPO's gradient gives each pair (only when the
    first loss is DPO's, ``sigmoid``);
    logps/chosen, logps/rejected: summed completion log-probs under the policy.
    """
    margin = out.chosen_reward - out.rejected_reward
    metrics = {
        "rewards/chosen": out.chosen_reward,
        "rewards/rejected": out.rejected_reward,
        "rewards/margins": margin,
        "rewards/accuracies": (margin > 0).float(),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }
    if first_loss in GRAD_WEIGHT_LOSSES:
        metrics["dpo/grad_weight"] = torch.sigmoid(-margin)
    # loss-specific extras; batch-level scalars are repeated per pair
    metrics.update({k: v.detach().expand_as(margin) for k, v in out.metrics.items()})
    return metrics


def unpaired_metrics(out: LossOutput, policy: SequenceLogps, preference: Tensor) -> dict[str, Tensor]:
    """Detached ``[B]`` metrics of an unpaired (KTO) loss, kept as per-class sums and counts so that
    the loop's averaging per example leaves their ratio exact; :func:`unpaired_derived` divides.

    ``sum/rewards/C``, ``sum/logps/C``: the class-C examples' implicit reward (beta * log(pi/pi_ref))
    and summed log-prob of their own completion, zero on the other rows; ``count/C``: 1 on a class-C
    row. ``kto/kl``: the KL reference point z0 of the row's micro-batch (log pi - log pi_ref of
    mismatched completions, clamped at 0). The mismatched completion's log-prob is not logged.
    """
    desirable = (preference > 0.5).float()
    # each row's reward sits on its class's side, 0 on the other
    reward = out.chosen_reward + out.rejected_reward
    logps = policy.chosen.detach()
    metrics: dict[str, Tensor] = {}
    for name, mask in zip(UNPAIRED_CLASSES, (desirable, 1 - desirable)):
        metrics[f"sum/rewards/{name}"] = reward * mask
        metrics[f"sum/logps/{name}"] = logps * mask
        metrics[f"count/{name}"] = mask
    metrics.update({f"kto/{k}": v.detach().expand_as(reward) for k, v in out.metrics.items()})
    return metrics


def unpaired_derived(row: dict[str, float]) -> dict[str, float]:
    """``rewards/C`` and ``logps/C`` (per-class means) from a row's sums and counts, for training
    rows and ``eval/`` rows; a class absent from the row gives no value."""
    out: dict[str, float] = {}
    for prefix in ("", "eval/"):
        for name in UNPAIRED_CLASSES:
            count = row.get(f"{prefix}count/{name}", 0.0)
            for what in ("rewards", "logps"):
                total = row.get(f"{prefix}sum/{what}/{name}")
                if total is not None and count > 0:
                    out[f"{prefix}{what}/{name}"] = total / count
    return out
