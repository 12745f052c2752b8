"""PPO-with-KL-penalty math (preftune.losses.ppo) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """Hand-worked values of size ~1 against a few fp32 operations (each within an ulp, ~1.2e-7 of 1):
    1e-6 by default; 1e-5 where the values reach ~2-4 or come from longer chains (exp, log, sums)."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# Two right-padded rows: real values 1, 2, 3 | 4, 5 (mean 3, biased var 2, unbiased var 10 / 4 = 2.5);
# the padding holds garbage that must never leak.
X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 1000.0, -7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


# ----------------------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("mask", [MASK, MASK.float(), MASK.long()])
def test_masked_mean(mask):
    close(masked_mean(X, mask), 3.0)
    close(masked_mean(X, mask, dim=1), [2.0, 4.5])  # (1+2+3)/3, (4+5)/2


def test_masked_mean_ignores_non_finite_padding():
    x = X.clone()
    x[0, 3], x[1, 2] = float("inf"), float("nan")
    close(masked_mean(x, MASK), 3.0)
    close(masked_var(x, MASK), 2.5)


def test_masked_var():
    close(masked_var(X, MASK), 2.5)  # (4 + 1 + 0 + 1 + 4) / (5 - 1)
    close(masked_var(X, MASK, unbiased=False), 2.0)  # 10 / 5
    one = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    close(masked_var(X, one), 0.0)  # a single token: no Bessel correction, no nan


def test_masked_whiten():
    out = masked_whiten(X, MASK)
    s = math.sqrt(2.5 + 1e-8)
    close(out, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    close(masked_mean(out, MASK), 0.0)
    close(masked_var(out, MASK), 1.0, atol=1e-5)
    assert (out[~MASK] == 0).all()


def test_masked_whiten_keep_mean():
    out = masked_whiten(X, MASK, shift_mean=False)
    s = math.sqrt(2.5 + 1e-8)
    close(out, [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]])
    close(masked_mean(out, MASK), 3.0)  # the mean is kept, only the scale changes
    close(masked_var(out, MASK), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_known_values():
    logp = torch.tensor([-1.0, -2.0, -2.0])
    ref = torch.tensor([-1.5, -2.0, -1.0])
    close(kl_penalty(logp, ref, "k1"), [0.5, 0.0, -1.0])
    # k3 = exp(log r) - 1 - log r, log r = ref - logp = -0.5, 0, 1
    close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, 0.0, math.e - 2])  # 0.10653, 0, 0.71828
    close(kl_penalty(logp, ref, "abs"), [0.5, 0.0, 1.0])
    close(kl_penalty(logp, ref, "mse"), [0.125, 0.0, 0.5])
    assert set(KL_ESTIMATORS) == {"k1", "k3", "abs", "mse"}


def test_k3_non_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, logp, "k3") == 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone can go negative


def test_kl_estimators_unbiased_on_samples():
    # p = (0.7, 0.2, 0.1), q = (0.4, 0.4, 0.2):
    # KL(p || q) = 0.7 ln(0.7/0.4) + 0.2 ln(0.2/0.4) + 0.1 ln(0.1/0.2) = 0.7 ln 1.75 - 0.3 ln 2 = 0.183787
    true_kl = 0.7 * math.log(1.75) - 0.3 * math.log(2.0)
    assert true_kl == pytest.approx(0.183787, abs=1e-6)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    g = torch.Generator().manual_seed(1234)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)  # samples from pi = p
    logp, ref = p.log()[y], q.log()[y]
    assert kl_penalty(logp, ref, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_penalty(logp, ref, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k2-ish")


# ----------------------------------------------------------------------------- rewards and GAE


def test_token_rewards():
    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = token_rewards(scores, kl, mask, kl_coef=0.5)
    # -0.5 * kl on real tokens; the score joins the last real token (index 3, index 1, none)
    close(out, [[-0.05, -0.1, -0.15, -0.2 + 2.0], [-0.25, -0.3 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


# Row 0: four real tokens. Row 1: two real tokens, then padding with garbage rewards/values.
R = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 1.0, 99.0, 99.0]])
V = torch.tensor([[0.5, 1.0, 0.0, 1.0], [2.0, -1.0, 50.0, 50.0]])
GAE_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)


def test_gae_by_hand():
    adv, ret = gae(R, V, GAE_MASK, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row 0: delta_3 = 2 - 1 = 1;  delta_2 = -1 + 0.9*1 - 0 = -0.1
    #        delta_1 = 0 + 0.9*0 - 1 = -1;  delta_0 = 1 + 0.9*1 - 0.5 = 1.4
    #        A_3 = 1;  A_2 = -0.1 + 0.72*1 = 0.62;  A_1 = -1 + 0.72*0.62 = -0.5536
    #        A_0 = 1.4 + 0.72*(-0.5536) = 1.001408
    # row 1: delta_1 = 1 - (-1) = 2 (no bootstrap into padding);  delta_0 = 0.5 + 0.9*(-1) - 2 = -2.4
    #        A_1 = 2;  A_0 = -2.4 + 0.72*2 = -0.96
    close(adv, [[1.001408, -0.5536, 0.62, 1.0], [-0.96, 2.0, 0.0, 0.0]], atol=1e-5)
    # returns = A + V
    close(ret, [[1.501408, 0.4464, 0.62, 2.0], [1.04, 1.0, 0.0, 0.0]], atol=1e-5)


def test_gae_padding_does_not_leak():
    r2, v2 = R.clone(), V.clone()
    r2[1, 2:], v2[1, 2:] = -1e4, 1e4
    adv, ret = gae(r2, v2, GAE_MASK, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = gae(R, V, GAE_MASK, gamma=0.9, lam=0.8)
    close(adv, ref_adv)
    close(ret, ref_ret)


def test_gae_limits():
    # gamma = lam = 1: returns are rewards-to-go (Monte Carlo), A = rewards-to-go - V
    adv, ret = gae(R, V, GAE_MASK, gamma=1.0, lam=1.0)
    close(ret, [[2.0, 1.0, 1.0, 2.0], [1.5, 1.0, 0.0, 0.0]])
    close(adv, [[1.5, 0.0, 1.0, 1.0], [-0.5, 2.0, 0.0, 0.0]])
    # lam = 0: A_t = delta_t (one-step TD error), here with gamma = 0.9
    adv, _ = gae(R, V, GAE_MASK, gamma=0.9, lam=0.0)
    close(adv, [[1.4, -1.0, -0.1, 1.0], [-2.4, 2.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- clipped losses


def test_clipped_policy_loss():
    # eps = 0.2, so ratios are clamped to [0.8, 1.2]
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 0.9])
    logp = ratio.log().requires_grad_()
    loss, clipped = clipped_policy_loss(logp, torch.zeros(6), adv, clip_range=0.2)
    # A>0, ratio 1.5: max(-1.5, -1.2) = -1.2, clipped  |  A>0, ratio 0.5: max(-0.5, -0.8) = -0.5, not
    # A<0, ratio 1.5: max(1.5, 1.2) = 1.5, not         |  A<0, ratio 0.5: max(0.5, 0.8) = 0.8, clipped
    # inside the range: -2 * 1.1 = -2.2 and 2 * 0.9 = 1.8, not clipped
    close(loss, [-1.2, -0.5, 1.5, 0.8, -2.2, 1.8], atol=1e-5)
    close(clipped, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    loss.sum().backward()
    # d/dlogp (-A * ratio) = -A * ratio where unclipped, 0 where clipped
    close(logp.grad, [0.0, -0.5, 1.5, 0.0, -2.2, 1.8], atol=1e-5)


def test_clipped_value_loss():
    values = torch.tensor([1.5, 1.5, 1.1, 0.5])
    old = torch.tensor([1.0, 1.0, 1.0, 1.0])
    returns = torch.tensor([2.0, 1.0, 3.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip_range_value=0.2)
    # V_clip = 1.2, 1.2, 1.1, 0.8
    # (V-R)^2 = 0.25, 0.25, 3.61, 0.25;  (V_clip-R)^2 = 0.64, 0.04, 3.61, 0.64
    close(loss, [0.32, 0.125, 1.805, 0.32], atol=1e-5)
    close(clipped, [1.0, 0.0, 0.0, 1.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip_range_value=None)
    close(loss, [0.125, 0.125, 1.805, 0.125], atol=1e-5)
    close(clipped, [0.0, 0.0, 0.0, 0.0])


def test_approx_kl():
    close(approx_kl(torch.tensor([0.0, -1.0, -3.0]), torch.tensor([0.5, -1.0, -1.0])), [0.125, 0.0, 2.0])


# ----------------------------------------------------------------------------- diagnostics


def test_explained_variance():
    # real returns 1, 2, 3 | 4, 5 (unbiased var 2.5); garbage in the padding of values
    assert explained_variance(X, X, MASK) == pytest.approx(1.0)
    const = torch.where(MASK, torch.full_like(X, 3.0), torch.full_like(X, -50.0))
    assert explained_variance(const, X, MASK) == pytest.approx(0.0, abs=1e-6)
    # R - V = 1, -1, 1 | -1, 0: mean 0, unbiased var 4 / 4 = 1 -> 1 - 1 / 2.5 = 0.6
    noisy = X + torch.tensor([[1.0, -1.0, 1.0, 7.0], [-1.0, 0.0, 3.0, 3.0]])
    assert explained_variance(noisy, X, MASK) == pytest.approx(0.6, abs=1e-6)
    assert explained_variance(0.5 * X, X, MASK) == pytest.approx(0.75, abs=1e-6)  # 1 - 0.25
    assert math.isnan(explained_variance(X, torch.ones_like(X), MASK))


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 3, 8)), torch.full((2, 3), math.log(8)))
    # p = (1/2, 1/4, 1/4): H = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2, invariant to shifting the logits
    logits = torch.tensor([0.5, 0.25, 0.25]).log()
    close(entropy_from_logits(logits), 1.5 * math.log(2))
    # logits near 1000 are rounded to fp32's grid there (ulp 6.1e-5): each up to 3e-5 off, and so is H
    close(entropy_from_logits(logits + 1000.0), 1.5 * math.log(2), atol=1e-4)
    peaked = entropy_from_logits(torch.tensor([0.0, 1000.0, 0.0]))
    assert torch.isfinite(peaked) and peaked.abs() < 1e-6


# ----------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (7.0, 0.1 * (1 + (7 / 6 - 1) * 256 / 10_000)),  # above: e = 1/6, mult = 1.00426667 -> 0.100426667
        (3.0, 0.1 * (1 - 0.2 * 256 / 10_000)),  # below: e = -0.5 clipped to -0.2, mult = 0.99488 -> 0.099488
        (60.0, 0.1 * (1 + 0.2 * 256 / 10_000)),  # far above: e = 9 clipped to 0.2, mult = 1.00512 -> 0.100512
        (6.0, 0.1),  # at target: unchanged
    ],
)
def test_adaptive_kl_controller(current_kl, expected):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_controller_numbers():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(7.0, 256)
    assert ctl.value == pytest.approx(0.10042666667, abs=1e-11)
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.10042666667 * 0.99488, abs=1e-11)  # 0.0999124821
    ctl.update(1e6, 10_000)  # one full horizon at the clip: * 1.2
    assert ctl.value == pytest.approx(0.0999124821 * 1.2, abs=1e-10)


def test_adaptive_kl_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, 512)
    other = AdaptiveKLController(0.3, target=1.0, horizon=5)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    ctl.update(2.0, 64)
    other.update(2.0, 64)
    assert other.value == ctl.value


def test_make_kl_controller():
    fixed = make_kl_controller(0.2, None, 10_000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.2
    adaptive = make_kl_controller(0.2, 6.0, 10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 6.0, 10_000)
    with pytest.raises(ValueError):
        make_kl_controller(0.2, 0.0, 10_000)
