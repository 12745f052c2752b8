"""DPO and its close relatives: logistic-type losses on the log-ratio margin u.

Notation for every loss in this package (all tensors ``[B]``, one value per pair):

    r_w = log pi(y_w) - log pi_ref(y_w),   r_l = log pi(y_l) - log pi_ref(y_l)
    u   = r_w - r_l                        (the DPO margin, summed over completion tokens)

``beta`` is the temperature. Rewards are the DPO implicit rewards beta * r_w, beta * r_l,
detached, exactly as TRL's DPOTrainer logs them for every loss type.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.base import LossInputs, LossOutput, register_loss


def margin_output(loss: Tensor, beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor) -> LossOutput:
    """``LossOutput`` with the DPO implicit rewards ``beta * r`` (detached)."""
    return LossOutput(loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def mean_logratios(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """``(r_w / n_w, r_l / n_l)``: log-ratios averaged over completion tokens, each ``[B]``.

    Policy and reference score the same tokens, so one count (the policy's) divides both.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    policy = inputs.policy
    return (chosen_ratio / policy.chosen_tokens.clamp(min=1),
            rejected_ratio / policy.rejected_tokens.clamp(min=1))


@register_loss("sigmoid")
def sigmoid(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with soft and smoothed labels.

    u = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))          [B]
    p = (1 - eps) * preference + eps * (1 - preference)                            [B]
    loss = -p * log sigmoid(beta * u) - (1 - p) * log sigmoid(-beta * u)           [B]

    With preference = 1 and eps = 0 this is the DPO loss; eps > 0 is conservative DPO
    (cDPO, Mitchell 2023); a per-row ``preference`` in [0, 1] is a soft label.
    d loss / d u = -beta * (p - sigmoid(beta * u)): for p = 1 the weight sigmoid(-beta u)
    = sigmoid(r_l - r_w) makes wrongly ordered pairs move the model most.
    Rewards: r = beta * log(pi / pi_ref), detached.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    logits = beta * (chosen_ratio - rejected_ratio)
    p = (1 - label_smoothing) * inputs.preference + label_smoothing * (1 - inputs.preference)
    loss = -p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("robust")
def robust(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Provably robust DPO (Chowdhury et al. 2024, arXiv 2403.00409).

    An unbiased estimate of the clean DPO loss when labels flip with rate eps = label_smoothing:

    loss = ((1 - eps) * -log sigmoid(beta u) - eps * -log sigmoid(-beta u)) / (1 - 2 eps)   [B]

    eps must lie in [0, 0.5): label_smoothing's registered range (``SHARED_RANGES``), an error when the
    config is read (TRL only warns). eps = 0 is DPO.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    logits = beta * (chosen_ratio - rejected_ratio)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return margin_output((clean - flipped) / (1 - 2 * label_smoothing), beta, chosen_ratio, rejected_ratio)


@register_loss("sigmoid_norm")
def sigmoid_norm(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO (TRL ``loss_type="sigmoid_norm"``).

    u_mean = r_w / n_w - r_l / n_l   (log-ratios averaged over completion tokens)    [B]
    loss = -log sigmoid(beta * u_mean)                                               [B]
    """
    chosen_mean, rejected_mean = mean_logratios(inputs)
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = -F.logsigmoid(beta * (chosen_mean - rejected_mean))
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("hinge")
def hinge(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """SLiC hinge loss (Zhao et al. 2023, arXiv 2305.10425), on the DPO margin.

    loss = relu(1 - beta * u)                                                        [B]

    1 / beta is the margin the log-ratio gap must clear; pairs past it get no gradient.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("exo_pair", ranges={"label_smoothing": "(0, 1)"})
def exo_pair(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float) -> LossOutput:
    """EXO, pairwise form (Ji et al. 2024, arXiv 2402.00856, Eq. 16).

    KL(q || p) for K = 2, with q = softmax over {y_w, y_l} of beta * r and p = [1 - eps, eps]:

    z = beta * u
    loss = sigmoid(z) * (log sigmoid(z) - log(1 - eps))
         + sigmoid(-z) * (log sigmoid(-z) - log eps)                                 [B]

    eps = label_smoothing is required and must lie in (0, 1), its registered range (the paper
    recommends 1e-3); as in TRL 1.x, zero is an error (TRL 0.x silently replaced it by 1e-3).
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    z = beta * (chosen_ratio - rejected_ratio)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    loss = log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (
        log_ql - math.log(label_smoothing)
    )
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("discopop", ranges={"discopop_tau": "> 0"})
def discopop(inputs: LossInputs, *, beta: float = 0.1, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5).

    z = beta * u,  m = sigmoid(z / tau)                                              [B]
    loss = (1 - m) * -log sigmoid(z) + m * exp(-z)                                   [B]

    tau = discopop_tau (paper default 0.05). m * exp(-z) is computed as
    exp(log sigmoid(z / tau) - z), equal in value to TRL's product but free of inf * 0 = nan
    when z is very negative.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    z = beta * (chosen_ratio - rejected_ratio)
    m = torch.sigmoid(z / discopop_tau)
    loss = (1 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)
