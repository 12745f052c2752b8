"""Squared losses that regress log-ratios to a target instead of pushing them to infinity.

Notation as in :mod:`preftune.losses.dpo`: r_w, r_l the policy/reference log-ratios and
u = r_w - r_l, all ``[B]``.
"""

from __future__ import annotations

from preftune.losses.base import LossInputs, LossOutput, register_loss
from preftune.losses.dpo import margin_output, mean_logratios


@register_loss("ipo")
def ipo(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), beta = the paper's tau.

    u_mean = r_w / n_w - r_l / n_l   (log-ratios averaged over completion tokens)    [B]
    loss = (u_mean - 1 / (2 beta))^2                                                 [B]

    The per-token average is TRL's choice (confirmed with the IPO authors): the summed form
    makes the squared loss scale with completion length.
    """
    chosen_mean, rejected_mean = mean_logratios(inputs)
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)


@register_loss("sppo_hard")
def sppo_hard(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P = 1 / 0).

    loss = (r_w - 1 / (2 beta))^2 + (r_l + 1 / (2 beta))^2                           [B]

    Each completion's log-ratio is regressed separately: the winner to +1/(2 beta), the
    loser to -1/(2 beta). Soft win probabilities (the paper's PairRM estimates) are not used.
    """
    chosen_ratio, rejected_ratio = inputs.logratios()
    loss = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    return margin_output(loss, beta, chosen_ratio, rejected_ratio)
