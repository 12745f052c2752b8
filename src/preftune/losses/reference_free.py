"""Losses that need no reference model: SFT (the RPO term), SimPO and ORPO.

They register with ``needs_reference=False`` and read only ``inputs.policy``, so they work
with ``reference=None`` (no reference model is loaded for them). Log-probs are averaged over
completion tokens: avg_w = log pi(y_w) / n_w, avg_l = log pi(y_l) / n_l, each ``[B]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.base import LossInputs, LossOutput, register_loss, zeros_like_reward


@register_loss("sft", needs_reference=False)
def sft(inputs: LossInputs) -> LossOutput:
    """The NLL term of RPO (Pang et al. 2024, arXiv 2404.19733): SFT on the chosen completion.

    loss = -log pi(y_w) / n_w          (per-token NLL of each pair's chosen completion)  [B]

    Meant to be combined with a preference loss, e.g. ``{sigmoid: 1.0, sft: 0.2}`` (RPO with
    alpha = 0.2; ``{simpo: 1.0, sft: alpha}`` is CPO's BC term). Rewards are zero.
    Difference from TRL: TRL averages the NLL over all chosen tokens of the batch (long
    completions weigh more); here each pair's per-token NLL counts once, as in the RPO paper.
    The two agree when all chosen completions have the same length.
    """
    loss = -inputs.policy.chosen_mean
    return LossOutput(loss, zeros_like_reward(loss), zeros_like_reward(loss))


@register_loss("simpo", needs_reference=False)
def simpo(
    inputs: LossInputs, *, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), reference-free, length-normalised.

    z = beta * (avg_w - avg_l) - gamma                                               [B]
    loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)                          [B]

    ``gamma`` is the absolute target margin, TRL's ``CPOConfig.simpo_gamma``; the SimPO
    repository's ``gamma_beta_ratio`` is gamma / beta. Defaults follow the paper's recipes
    (beta = 2.0, gamma / beta = 0.5), not TRL's CPOConfig defaults (beta 0.1, gamma 0.5).
    eps = label_smoothing as in TRL's CPO (0 in the paper).
    Rewards: beta * avg log-prob of each completion, detached (as TRL's CPOTrainer logs them).
    """
    chosen_avg, rejected_avg = inputs.policy.chosen_mean, inputs.policy.rejected_mean
    z = beta * (chosen_avg - rejected_avg) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return LossOutput(loss, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    cut = -math.log(2)
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))),
                       torch.log(-torch.expm1(x.clamp(min=cut))))


@register_loss("orpo", needs_reference=False)
def orpo(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4-7), beta = the paper's lambda.

    log odds(y) = avg - log(1 - exp(avg))       (odds of the per-token average prob)   [B]
    loss = -avg_w - beta * log sigmoid(log odds(y_w) - log odds(y_l))               [B]

    ``beta`` is named as in TRL's ORPOConfig (default 0.1). Metrics: ``orpo/log_odds_ratio``
    (log sigmoid of the log-odds gap) and ``orpo/log_odds_chosen`` (the gap), per pair.
    Rewards: beta * avg log-prob, detached (as TRL logs them).
    Difference from TRL: TRL's NLL term is a token mean over prompt + chosen completion of the
    whole batch; here it is the per-pair mean over chosen completion tokens only.
    """
    chosen_avg, rejected_avg = inputs.policy.chosen_mean, inputs.policy.rejected_mean
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    loss = -chosen_avg - beta * ratio
    metrics = {"orpo/log_odds_ratio": ratio.detach(), "orpo/log_odds_chosen": log_odds.detach()}
    return LossOutput(loss, (beta * chosen_avg).detach(), (beta * rejected_avg).detach(), metrics)
