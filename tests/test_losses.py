"""Every registered loss against an independent numpy computation: per-pair values and gradients.

The numpy references below are written from the papers / TRL's formulas, not from the torch
code. Gradients w.r.t. the policy log-probs are checked against central finite differences of
the numpy reference (and, for DPO, against the closed-form gradient weight). Statistics a
loss detaches (BCO's reward mean, KTO's KL point z0) are computed from the unperturbed inputs
in the reference, so the finite differences treat them as constants, like autograd does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from preftune.losses import LOSSES, LossInputs, LossOutput, PreferenceLoss, SequenceLogps, register_loss
from preftune.losses.base import zeros_like_reward


@dataclass(frozen=True)
class Case:
    """Summed log-probs of 4 hand-chosen pairs (policy pw/pl, reference rw/rl), token counts, labels."""

    pw: np.ndarray
    pl: np.ndarray
    rw: np.ndarray
    rl: np.ndarray
    nw: np.ndarray
    nl: np.ndarray
    pref: np.ndarray


def arr(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


# r_w = pw - rw = [1, -1.5, 0.5, 1.5], r_l = pl - rl = [-1, 1.5, -0.75, -2], u = [2, -3, 1.25, 3.5]
PAIRS = Case(
    pw=arr(-12.0, -30.5, -2.5, -20.0), pl=arr(-15.0, -28.0, -9.5, -26.0),
    rw=arr(-13.0, -29.0, -3.0, -21.5), rl=arr(-14.0, -29.5, -8.75, -24.0),
    nw=arr(6, 15, 5, 10), nl=arr(8, 12, 5, 13), pref=arr(1, 1, 1, 1),
)
SOFT = replace(PAIRS, pref=arr(1.0, 0.7, 0.5, 0.0))
# unpaired (KTO): pw = labelled completion, pl = mismatched completion; mean(pl - rl) = 0.375 > 0
KTO_ROWS = replace(PAIRS, pl=arr(-14.5, -28.0, -9.0, -23.25), pref=arr(1, 0, 1, 0))
KTO_CLAMPED = replace(PAIRS, pref=arr(1, 0, 0, 1))  # mean(pl - rl) = -0.5625 -> z0 = 0
BETA = 0.4  # keeps every pair away from the hinge's kink


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def ratios(pw, pl, c):
    return pw - c.rw, pl - c.rl


def np_sigmoid(pw, pl, c, beta=0.1, label_smoothing=0.0):
    rw, rl = ratios(pw, pl, c)
    z = beta * (rw - rl)
    p = (1 - label_smoothing) * c.pref + label_smoothing * (1 - c.pref)
    return -p * logsig(z) - (1 - p) * logsig(-z)


def np_robust(pw, pl, c, beta=0.1, label_smoothing=0.0):
    rw, rl = ratios(pw, pl, c)
    z, e = beta * (rw - rl), label_smoothing
    return ((1 - e) * -logsig(z) - e * -logsig(-z)) / (1 - 2 * e)


def np_hinge(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return np.maximum(0.0, 1 - beta * (rw - rl))


def np_ipo(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return (rw / c.nw - rl / c.nl - 1 / (2 * beta)) ** 2


def np_sigmoid_norm(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return -logsig(beta * (rw / c.nw - rl / c.nl))


def np_exo_pair(pw, pl, c, beta=0.1, label_smoothing=None):
    rw, rl = ratios(pw, pl, c)
    z, e = beta * (rw - rl), label_smoothing
    qw, ql = sig(z), sig(-z)  # KL(q || [1 - e, e])
    return qw * (np.log(qw) - np.log(1 - e)) + ql * (np.log(ql) - np.log(e))


def np_nca_pair(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return -logsig(beta * rw) - 0.5 * logsig(-beta * rw) - 0.5 * logsig(-beta * rl)


def np_bco_pair(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    rw0, rl0 = ratios(c.pw, c.pl, c)
    delta = beta * np.concatenate([rw0, rl0]).mean()  # detached: from the unperturbed batch
    return -logsig(beta * rw - delta) - logsig(-(beta * rl - delta))


def np_sppo_hard(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return (rw - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2


def np_apo_zero(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return (1 - sig(beta * rw)) + sig(beta * rl)


def np_apo_down(pw, pl, c, beta=0.1):
    rw, rl = ratios(pw, pl, c)
    return sig(beta * rw) + (1 - sig(beta * (rw - rl)))


def np_aot(pw, pl, c, beta=0.1, label_smoothing=0.0):
    d = np.sort(pw - pl) - np.sort(c.rw - c.rl)
    return -(1 - label_smoothing) * logsig(beta * d) - label_smoothing * logsig(-beta * d)


def np_aot_unpaired(pw, pl, c, beta=0.1, label_smoothing=0.0):
    rw, rl = ratios(pw, pl, c)
    d = np.sort(rw) - np.sort(rl)
    return -(1 - label_smoothing) * logsig(beta * d) - label_smoothing * logsig(-beta * d)


def np_discopop(pw, pl, c, beta=0.1, discopop_tau=0.05):
    rw, rl = ratios(pw, pl, c)
    z = beta * (rw - rl)
    m = sig(z / discopop_tau)
    return -logsig(z) * (1 - m) + np.exp(-z) * m


def np_sft(pw, pl, c):
    return -pw / c.nw


def np_simpo(pw, pl, c, beta=2.0, gamma=1.0, label_smoothing=0.0):
    z = beta * (pw / c.nw - pl / c.nl) - gamma
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def np_orpo(pw, pl, c, beta=0.1):
    aw, al = pw / c.nw, pl / c.nl
    log_odds = lambda a: a - np.log(1 - np.exp(a))  # noqa: E731
    return -aw - beta * logsig(log_odds(aw) - log_odds(al))


def np_kto(pw, pl, c, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    r = pw - c.rw
    z0 = max(0.0, float(np.mean(c.pl - c.rl)))  # detached KL point, from the unperturbed batch
    good = desirable_weight * (1 - sig(beta * (r - z0)))
    bad = undesirable_weight * (1 - sig(beta * (z0 - r)))
    return np.where(c.pref > 0.5, good, bad)


def np_chosen_logratio_l2(pw, pl, c, l2_tolerance=0.0):
    rw, _ = ratios(pw, pl, c)
    return np.maximum(0.0, np.abs(rw / c.nw) - l2_tolerance) ** 2


# (loss name, hyperparameters, case, numpy reference)
GOLDEN = [
    ("sigmoid", {"beta": BETA}, PAIRS, np_sigmoid),
    ("sigmoid", {"beta": BETA, "label_smoothing": 0.1}, PAIRS, np_sigmoid),
    ("sigmoid", {"beta": BETA, "label_smoothing": 0.1}, SOFT, np_sigmoid),
    ("robust", {"beta": BETA, "label_smoothing": 0.2}, PAIRS, np_robust),
    ("robust", {"beta": BETA}, PAIRS, np_robust),
    ("hinge", {"beta": BETA}, PAIRS, np_hinge),
    ("ipo", {"beta": BETA}, PAIRS, np_ipo),
    ("sigmoid_norm", {"beta": BETA}, PAIRS, np_sigmoid_norm),
    ("exo_pair", {"beta": BETA, "label_smoothing": 1e-3}, PAIRS, np_exo_pair),
    ("exo_pair", {"beta": BETA, "label_smoothing": 0.3}, PAIRS, np_exo_pair),
    ("nca_pair", {"beta": BETA}, PAIRS, np_nca_pair),
    ("bco_pair", {"beta": BETA}, PAIRS, np_bco_pair),
    ("sppo_hard", {"beta": BETA}, PAIRS, np_sppo_hard),
    ("apo_zero", {"beta": BETA}, PAIRS, np_apo_zero),
    ("apo_down", {"beta": BETA}, PAIRS, np_apo_down),
    ("aot", {"beta": BETA, "label_smoothing": 0.1}, PAIRS, np_aot),
    ("aot_unpaired", {"beta": BETA, "label_smoothing": 0.1}, PAIRS, np_aot_unpaired),
    ("discopop", {"beta": BETA}, PAIRS, np_discopop),
    ("discopop", {"beta": BETA, "discopop_tau": 0.5}, PAIRS, np_discopop),
    ("sft", {}, PAIRS, np_sft),
    ("simpo", {}, PAIRS, np_simpo),
    ("simpo", {"beta": 2.5, "gamma": 0.3, "label_smoothing": 0.1}, PAIRS, np_simpo),
    ("orpo", {"beta": 0.25}, PAIRS, np_orpo),
    ("kto", {"beta": BETA}, KTO_ROWS, np_kto),
    ("kto", {"beta": BETA, "desirable_weight": 1.5, "undesirable_weight": 0.7}, KTO_CLAMPED, np_kto),
    ("chosen_logratio_l2", {}, PAIRS, np_chosen_logratio_l2),
    ("chosen_logratio_l2", {"l2_tolerance": 0.12}, PAIRS, np_chosen_logratio_l2),
]


def t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def run_loss(weights: dict, params: dict, c: Case, with_reference: bool = True):
    """Evaluate through PreferenceLoss; returns the output and the policy leaf tensors."""
    pw, pl = t(c.pw, grad=True), t(c.pl, grad=True)
    policy = SequenceLogps(pw, pl, t(c.nw), t(c.nl))
    reference = SequenceLogps(t(c.rw), t(c.rl), t(c.nw), t(c.nl)) if with_reference else None
    return PreferenceLoss(weights, params)(LossInputs(policy, reference, t(c.pref))), pw, pl


def grad_of(x: torch.Tensor) -> np.ndarray:
    """The accumulated gradient; zeros where the loss does not depend on ``x`` at all."""
    return np.zeros(x.shape) if x.grad is None else x.grad.numpy()


def fd_grads(fn, c: Case, params: dict, h: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Central finite differences of sum_i fn(...)_i w.r.t. the policy chosen / rejected log-probs."""
    grads = []
    for which in ("pw", "pl"):
        g = np.zeros(len(c.pw))
        for i in range(len(c.pw)):
            up, down = getattr(c, which).copy(), getattr(c, which).copy()
            up[i] += h
            down[i] -= h
            args_up = (up, c.pl) if which == "pw" else (c.pw, up)
            args_down = (down, c.pl) if which == "pw" else (c.pw, down)
            g[i] = (fn(*args_up, c, **params).sum() - fn(*args_down, c, **params).sum()) / (2 * h)
        grads.append(g)
    return grads[0], grads[1]


@pytest.mark.parametrize(("name", "params", "case", "reference"), GOLDEN,
                         ids=lambda x: x if isinstance(x, str) else None)
def test_golden_loss_and_gradient(name, params, case, reference):
    spec = LOSSES[name]
    out, pw, pl = run_loss({name: 1.0}, params, case, with_reference=spec.needs_reference)
    expected = reference(case.pw, case.pl, case, **params)
    assert out.loss.shape == (4,)
    # float64 on both sides, exact inputs: a few dozen operations apart, ~1e-15 relative (1e-10 is
    # far from the rounding and far below any formula slip)
    np.testing.assert_allclose(out.loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    out.loss.sum().backward()
    gw, gl = fd_grads(reference, case, params)
    # central differences with h = 1e-6: truncation ~h^2 = 1e-12, rounding ~eps64 * |sum of losses| / h
    # ~ 1e-8 for sums up to ~30
    np.testing.assert_allclose(grad_of(pw), gw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_of(pl), gl, rtol=1e-5, atol=1e-7)
    for reward in (out.chosen_reward, out.rejected_reward):
        assert reward.shape == (4,) and not reward.requires_grad


def test_every_registered_loss_has_a_golden_test():
    """A loss added to preftune.losses without an entry in GOLDEN fails here."""
    ours = {name for name, spec in LOSSES.items() if spec.fn.__module__.startswith("preftune.losses")}
    assert ours - {name for name, *_ in GOLDEN} == set()
    assert len(ours) >= 19


def test_golden_values_by_hand():
    """A few per-pair values worked out with math only (pair 0: r_w = 1, r_l = -1, u = 2)."""
    out, _, _ = run_loss({"sigmoid": 1.0}, {"beta": BETA}, PAIRS)
    assert out.loss[0].item() == pytest.approx(math.log1p(math.exp(-0.8)))
    out, _, _ = run_loss({"ipo": 1.0}, {"beta": 0.5}, PAIRS)
    assert out.loss[0].item() == pytest.approx((1 / 6 + 1 / 8 - 1.0) ** 2)
    out, _, _ = run_loss({"hinge": 1.0}, {"beta": BETA}, PAIRS)
    assert out.loss.tolist() == pytest.approx([0.2, 2.2, 0.5, 0.0])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_gradient_weight(beta):
    """d loss / d log pi(y_w) = -beta * sigmoid(-beta u) for p = 1; +beta * sigmoid(-beta u) for y_l."""
    out, pw, pl = run_loss({"sigmoid": 1.0}, {"beta": beta}, PAIRS)
    out.loss.sum().backward()
    u = (PAIRS.pw - PAIRS.rw) - (PAIRS.pl - PAIRS.rl)
    # float64 autograd against the closed form: a few ulps (~1e-16) apart
    np.testing.assert_allclose(pw.grad.numpy(), -beta * sig(-beta * u), rtol=1e-12)
    np.testing.assert_allclose(pl.grad.numpy(), beta * sig(-beta * u), rtol=1e-12)
    np.testing.assert_allclose(out.chosen_reward.numpy(), beta * (PAIRS.pw - PAIRS.rw))
    np.testing.assert_allclose(out.rejected_reward.numpy(), beta * (PAIRS.pl - PAIRS.rl))


def test_dpo_gradient_weight_soft_labels():
    """With label p (after smoothing): d loss / d log pi(y_w) = -beta * (p - sigmoid(beta u))."""
    beta, eps = 0.3, 0.1
    out, pw, pl = run_loss({"sigmoid": 1.0}, {"beta": beta, "label_smoothing": eps}, SOFT)
    out.loss.sum().backward()
    u = (SOFT.pw - SOFT.rw) - (SOFT.pl - SOFT.rl)
    p = (1 - eps) * SOFT.pref + eps * (1 - SOFT.pref)
    np.testing.assert_allclose(pw.grad.numpy(), -beta * (p - sig(beta * u)), rtol=1e-12)
    np.testing.assert_allclose(pl.grad.numpy(), beta * (p - sig(beta * u)), rtol=1e-12)
    # p = 0.5 pulls u towards 0: the pair with u > 0 is pushed down
    assert pw.grad[2] > 0


def test_kto_rewards_and_kl_metric():
    out, _, pl = run_loss({"kto": 1.0}, {"beta": BETA}, KTO_ROWS)
    r = BETA * (KTO_ROWS.pw - KTO_ROWS.rw)
    np.testing.assert_allclose(out.chosen_reward.numpy(), [r[0], 0, r[2], 0])
    np.testing.assert_allclose(out.rejected_reward.numpy(), [0, r[1], 0, r[3]])
    assert out.metrics["kl"].item() == pytest.approx(0.375)
    out.loss.sum().backward()
    assert not grad_of(pl).any()  # the KL point is detached
    clamped, _, _ = run_loss({"kto": 1.0}, {"beta": BETA}, KTO_CLAMPED)
    assert clamped.metrics["kl"].item() == 0.0


@pytest.mark.parametrize("name", ["simpo", "orpo", "sft"])
def test_reference_free_losses_work_without_reference(name):
    assert not PreferenceLoss({name: 1.0}).needs_reference
    out, pw, _ = run_loss({name: 1.0}, {}, PAIRS, with_reference=False)
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(pw.grad).all()


def test_reference_losses_say_when_reference_is_missing():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        run_loss({"sigmoid": 1.0}, {}, PAIRS, with_reference=False)


def test_sft_combines_with_dpo_by_weight():
    combined, _, _ = run_loss({"sigmoid": 1.0, "sft": 0.2}, {"beta": BETA}, PAIRS)
    np.testing.assert_allclose(combined.loss.detach().numpy(),
                               np_sigmoid(PAIRS.pw, PAIRS.pl, PAIRS, beta=BETA) + 0.2 * PAIRS.pw / -PAIRS.nw)
    # from the first loss
    np.testing.assert_allclose(combined.chosen_reward.numpy(), BETA * (PAIRS.pw - PAIRS.rw))
    assert {"loss/sigmoid", "loss/sft"} <= combined.metrics.keys()
    assert PreferenceLoss({"sigmoid": 1.0, "sft": 0.2}).needs_reference


def test_user_constraint_as_documented():
    """The how-to in preftune.losses.constraints: register a term, combine it by weight."""

    @register_loss("test_rejected_floor")
    def rejected_floor(inputs: LossInputs, *, floor: float = -5.0) -> LossOutput:
        _, rejected_ratio = inputs.logratios()
        loss = torch.relu(floor - rejected_ratio) ** 2
        return LossOutput(loss, zeros_like_reward(loss), zeros_like_reward(loss))

    try:
        assert LOSSES["test_rejected_floor"].optional == {"floor": -5.0}
        out, _, _ = run_loss({"sigmoid": 1.0, "test_rejected_floor": 0.5}, {"beta": BETA, "floor": -1.0},
                             PAIRS)
        rl = PAIRS.pl - PAIRS.rl
        expected = np_sigmoid(PAIRS.pw, PAIRS.pl, PAIRS, beta=BETA) + 0.5 * np.maximum(0.0, -1.0 - rl) ** 2
        np.testing.assert_allclose(out.loss.detach().numpy(), expected)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_rejected_floor")(rejected_floor)
    finally:
        LOSSES.pop("test_rejected_floor")


def test_builtin_constraint_combines_by_weight():
    out, _, _ = run_loss({"sigmoid": 1.0, "chosen_logratio_l2": 0.1}, {"beta": BETA, "l2_tolerance": 0.1},
                         PAIRS)
    expected = np_sigmoid(PAIRS.pw, PAIRS.pl, PAIRS, beta=BETA) + 0.1 * np_chosen_logratio_l2(
        PAIRS.pw, PAIRS.pl, PAIRS, l2_tolerance=0.1
    )
    np.testing.assert_allclose(out.loss.detach().numpy(), expected)


def test_unknown_loss_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown loss 'sigmiod' \(did you mean 'sigmoid'\?\)"):
        PreferenceLoss({"sigmiod": 1.0})


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(ValueError, match="'exo_pair' needs label_smoothing"):
        PreferenceLoss({"exo_pair": 1.0}, {"beta": 0.1})
    with pytest.raises(ValueError, match=r"loss_params.label_smoothing must be in \(0, 1\), got 0.0"):
        run_loss({"exo_pair": 1.0}, {"label_smoothing": 0.0}, PAIRS)


@pytest.mark.parametrize(("weights", "params", "unused"), [
    ({"sigmoid": 1.0}, {"beta": 0.1, "gamma": 0.5}, "gamma"),
    ({"hinge": 1.0}, {"label_smoothing": 0.1}, "label_smoothing"),
    ({"sft": 1.0}, {"beta": 0.1}, "beta"),
    ({"kto": 1.0}, {"discopop_tau": 0.1}, "discopop_tau"),
])
def test_parameter_unused_by_selected_losses(weights, params, unused):
    with pytest.raises(ValueError, match=f"parameter '{unused}' is not used"):
        PreferenceLoss(weights, params)


def test_parameter_typo_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'discopop_tau'"):
        PreferenceLoss({"discopop": 1.0}, {"discopop_ta": 0.1})


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_flip_rate_outside_range(eps):
    with pytest.raises(ValueError, match=r"loss_params.label_smoothing must be in \[0, 0.5\)"):
        run_loss({"robust": 1.0}, {"label_smoothing": eps}, PAIRS)


@pytest.mark.parametrize("paired", ["sigmoid", "simpo", "chosen_logratio_l2"])
def test_paired_and_unpaired_losses_do_not_mix(paired):
    with pytest.raises(ValueError, match="mix paired and unpaired"):
        PreferenceLoss({paired: 1.0, "kto": 1.0})
    assert PreferenceLoss({"kto": 1.0}).data_kind == "unpaired"


def test_loss_functions_are_finite_at_extremes():
    """Large margins (either sign) give finite losses and gradients, e.g. discopop's exp(-z)."""
    big = replace(PAIRS, pw=PAIRS.pw + arr(2000.0, -2000.0, 0.0, 0.0),
                  pl=PAIRS.pl + arr(-1500.0, 1500.0, 0.0, 0.0))
    for name in ("sigmoid", "robust", "discopop", "nca_pair", "bco_pair", "apo_zero", "apo_down", "aot"):
        out, pw, pl = run_loss({name: 1.0}, {"beta": 0.5}, big)
        out.loss.sum().backward()
        assert (torch.isfinite(out.loss).all() and torch.isfinite(pw.grad).all()
                and torch.isfinite(pl.grad).all())
