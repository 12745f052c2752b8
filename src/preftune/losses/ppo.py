"""The pure math of PPO with a KL penalty for language models (RLHF).

References: Ziegler et al. 2019 (arXiv 1909.08593), Stiennon et al. 2020 (arXiv 2009.01325),
Ouyang et al. 2022 (arXiv 2203.02155); conventions follow TRL's PPO trainer and OpenRLHF.

All per-token tensors are right-padded ``[B, T]`` with a ``mask`` ``[B, T]`` (bool or float, 1 = a real
completion token; each row's real tokens are a prefix of the row). One PPO step with these pieces:

1. Rollout: sample completions from pi_old, score them with the reward model (``scores`` ``[B]``), and
   record per-token log-probs ``old_logp`` (pi_old), ``ref_logp`` (frozen pi_ref) and values ``V_old``.
2. Per-token rewards (:func:`token_rewards`): a KL penalty on every token plus the score at the end,

       r_t = -beta * kl_t + [t = last real token] * score,    kl_t = KL estimator (:func:`kl_penalty`).

3. Advantages by GAE (:func:`gae`), with no bootstrap past the last real token,

       delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},    R_t = A_t + V_t,

   then whitened over the batch's real tokens (:func:`masked_whiten`).
4. Several epochs of minibatch updates on the fixed rollout, with ratio rho_t = pi(y_t) / pi_old(y_t):

       L_pi = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
       L_V  = mean_t 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)
       L    = L_pi + vf_coef * L_V

   (:func:`clipped_policy_loss`, :func:`clipped_value_loss`; means over real tokens, :func:`masked_mean`).

5. The KL coefficient beta is fixed or adapted towards a target KL (:class:`AdaptiveKLController`).

Everything here is a small pure function: callers compute rollout quantities (rewards, advantages, returns)
under ``torch.no_grad()`` or on detached tensors, and reduce per-token losses with :func:`masked_mean`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3", "abs", "mse")


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over real tokens: ``sum(x * m) / sum(m)``.

    ``x``, ``mask``: ``[B, T]``. ``dim=None`` gives a scalar over all real tokens; ``dim=1`` gives ``[B]``
    (per-row means). Positions with ``m = 0`` never contribute (even if they hold inf / nan); an empty
    selection gives nan.
    """
    m = _float_mask(mask, x)
    x = torch.where(m > 0, x, torch.zeros_like(x))
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim) / m.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of ``x`` over all real tokens.

    ``var = sum(m * (x - mu)^2) / n`` with ``mu = masked_mean(x, mask)``, ``n = sum(m)``; when ``unbiased``
    and ``n > 1`` it is multiplied by ``n / (n - 1)`` (Bessel's correction). ``x``, ``mask``: ``[B, T]``.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _float_mask(mask, x).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` over real tokens: ``(x - mu) / sqrt(var + eps)`` (``var`` unbiased), 0 on padding.

    With ``shift_mean=False`` the mean is added back, ``(x - mu) / sqrt(var + eps) + mu``: only the scale
    is normalised (TRL's convention for rewards). ``x``, ``mask``: ``[B, T]``; returns ``[B, T]``.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_float_mask(mask, x) > 0, whitened, torch.zeros_like(whitened))


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi, ``[B, T]`` each.

    With ``log r = ref_logp - logp`` (so ``E_pi[r] = 1``):

    - ``"k1"``: ``logp - ref_logp = -log r`` (unbiased, can be negative, high variance);
    - ``"k3"``: ``(r - 1) - log r = exp(ref_logp - logp) - 1 - (ref_logp - logp)`` (Schulman's estimator:
      unbiased and non-negative, lower variance);
    - ``"abs"``: ``|logp - ref_logp|``;
    - ``"mse"``: ``0.5 * (logp - ref_logp)^2`` (k2).
    """
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k3":
        log_r = -diff
        return torch.expm1(log_r) - log_r
    if estimator == "abs":
        return diff.abs()
    if estimator == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """Per-token rewards ``[B, T]``: ``r_t = -kl_coef * kl_t`` on real tokens, plus ``scores[b]`` at row b's
    last real token; 0 on padding (a row with no real token is all 0).

    ``scores``: ``[B]`` sequence-level rewards; ``kl``, ``mask``: ``[B, T]`` (pass a detached ``kl``).
    """
    m = _float_mask(mask, kl)
    rewards = torch.where(m > 0, -kl_coef * kl, torch.zeros_like(kl))
    n = m.sum(1).long()
    last = (n - 1).clamp(min=0).unsqueeze(1)
    bonus = torch.where(n > 0, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(1, last, bonus.unsqueeze(1))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016); returns ``(advantages, returns)``, ``[B, T]``.

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t``,
    ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}`` (no bootstrap past the last real token),
    ``returns_t = A_t + V_t``; both are 0 on padding. ``rewards``, ``values``, ``mask``: ``[B, T]``.
    Call under ``torch.no_grad()`` (or on detached tensors): advantages are constants for the losses.
    """
    m = _float_mask(mask, values)
    zero = torch.zeros_like(values)
    values = torch.where(m > 0, values, zero)
    rewards = torch.where(m > 0, rewards, zero)
    T = values.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    next_mask = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_adv = delta + gamma * lam * next_mask * next_adv
        reversed_adv.append(next_adv)
        next_value, next_mask = values[:, t], m[:, t]
    advantages = torch.stack(reversed_adv[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token; returns ``(loss, clipped)``, both ``[B, T]`` (reduce with a mask).

    ``ratio = exp(logp - old_logp)``,
    ``loss = max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))``, and ``clipped`` is the float indicator
    ``-A * clamp(ratio) > -A * ratio`` that the clipped branch was taken (its masked mean is the clip
    fraction; a clipped token gets no gradient).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(unclipped.dtype)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range_value: float | None
) -> tuple[Tensor, Tensor]:
    """Clipped value loss per token; returns ``(loss, clipped)``, both ``[B, T]`` (reduce with a mask).

    ``V_clip = clamp(V, V_old - c, V_old + c)``,
    ``loss = 0.5 * max((V - R)^2, (V_clip - R)^2)``, ``clipped = [(V_clip - R)^2 > (V - R)^2]`` (float).
    ``clip_range_value=None`` gives the unclipped ``0.5 * (V - R)^2`` and an all-zero indicator.
    """
    loss = (values - returns).square()
    if clip_range_value is None:
        return 0.5 * loss, torch.zeros_like(loss)
    v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_clip = (v_clip - returns).square()
    return 0.5 * torch.maximum(loss, loss_clip), (loss_clip > loss).to(loss.dtype)


def approx_kl(logp: Tensor, old_logp: Tensor) -> Tensor:
    """Per-token ``0.5 * (logp - old_logp)^2`` (TRL's ``approxkl``; the k2 estimator of KL(pi_old || pi)
    on tokens sampled from pi_old), a diagnostic of how far an update moved the policy; ``[B, T]``.
    """
    return 0.5 * (logp - old_logp).square()


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over real tokens (1 = perfect value function, 0 = no better than a
    constant); nan when ``Var[R] == 0``. ``values``, ``returns``, ``mask``: ``[B, T]``.
    """
    var_returns = masked_var(returns, mask).item()
    if var_returns == 0 or math.isnan(var_returns):
        return math.nan
    return 1.0 - masked_var(returns - values, mask).item() / var_returns


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, stably: ``H = logsumexp(z) - sum_v p_v * z_v``.

    ``logits``: ``[..., V]`` (e.g. ``[B, T, V]``); returns ``[...]``.
    """
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class FixedKLController:
    """A constant KL coefficient ``value``; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2), steering the observed KL to ``target``.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``, ``value *= 1 + e * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = int(d.get("horizon", self.horizon))


def make_kl_controller(
    kl_coef: float, target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """An :class:`AdaptiveKLController` starting at ``kl_coef`` when ``target`` is given, else a fixed one."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
