"""Paired losses that treat the chosen and rejected log-ratios separately (TRL's DPOTrainer family).

Notation as in :mod:`preftune.losses.dpo`: r_w, r_l the policy/reference log-ratios, all ``[B]``.
Every definition follows TRL's ``DPOTrainer`` (``loss_type=...``), so the same inputs give the
same per-pair numbers; ``bco_pair`` is the one documented exception (a batch mean, not a
running mean). Rewards are beta * r_w and beta * r_l, detached, as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.base import LossInputs, LossOutput, register_loss
from preftune.losses.dpo import margin_output


@register_loss("nca_pair")
def nca_pair(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369, noise contrastive alignment).

    loss = -log sigmoid(beta r_w) - 0.5 log sigmoid(-beta r_w) - 0.5 log sigmoid(-beta r_l)   [B]

    Absolute, not relative, likelihood: the chosen log-ratio is pushed up on its own.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    rw, rl = beta * chosen_ratio, beta * rejected_ratio
    loss = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("bco_pair")
def bco_pair(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656, binary classifier optimisation).

    delta = mean over the batch of [beta r_w ; beta r_l]   (a detached scalar)
    loss = -log sigmoid(beta r_w - delta) - log sigmoid(-(beta r_l - delta))          [B]

    Difference from TRL: TRL 0.x shifts by a running mean of the rewards over all steps so
    far (``RunningMoments``, whose first value is this batch mean); TRL 1.x drops the shift
    (delta = 0). Here delta is the current batch mean, which keeps the function pure.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    rw, rl = beta * chosen_ratio, beta * rejected_ratio
    delta = torch.cat((rw, rl)).mean().detach()
    loss = -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("apo_zero")
def apo_zero(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7).

    loss = (1 - sigmoid(beta r_w)) + sigmoid(beta r_l)                               [B]

    For chosen outputs better than the model's own: raise chosen, lower rejected likelihood.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("apo_down")
def apo_down(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8).

    loss = sigmoid(beta r_w) + (1 - sigmoid(beta (r_w - r_l)))                       [B]

    For chosen outputs worse than the model's own: lower chosen, lower rejected more.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


def _smoothed_logistic(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


@register_loss("aot")
def aot(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, alignment via optimal transport).

    s = sort over the batch of (log pi(y_w) - log pi(y_l))                          [B]
    s_ref = sort over the batch of (log pi_ref(y_w) - log pi_ref(y_l))               [B]
    delta = s - s_ref  (first-order stochastic dominance, quantile by quantile)      [B]
    loss = -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)         [B]

    Entry k of the loss belongs to the k-th quantile, not to pair k; only its mean (what the
    caller takes) is meaningful. eps = label_smoothing. Rewards stay per pair.
    """
    ref = inputs.ref()
    policy_sorted, _ = torch.sort(inputs.policy.chosen - inputs.policy.rejected, dim=0)
    ref_sorted, _ = torch.sort(ref.chosen - ref.rejected, dim=0)
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = _smoothed_logistic(policy_sorted - ref_sorted, beta, label_smoothing)
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("aot_unpaired")
def aot_unpaired(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired form (Melnyk et al. 2024, arXiv 2406.05882; TRL 0.x called it ``aot_pair``).

    delta = sort over the batch of r_w  -  sort over the batch of r_l                [B]
    loss = -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)         [B]

    Takes paired batches (as in TRL) but ignores the pairing: the chosen and rejected
    log-ratio distributions are compared quantile by quantile. Entry k is the k-th quantile.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    chosen_sorted, _ = torch.sort(chosen_ratio, dim=0)
    rejected_sorted, _ = torch.sort(rejected_ratio, dim=0)
    loss = _smoothed_logistic(chosen_sorted - rejected_sorted, beta, label_smoothing)
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)
