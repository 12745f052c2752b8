"""Every registered objective trains through the one loop; reference-free losses load no reference;
KTO on unpaired data; user constraints; the Bradley-Terry reward model and its score API."""

from __future__ import annotations

import json
import random

import pytest

import preftune.methods.dpo as dpo_module
from helpers import base_config, words
from preftune.losses import LOSSES
from preftune.methods.dpo import train_dpo

PARAMS = {"exo_pair": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.1}, "simpo": {"beta": 2.0}}
CONSTRAINTS = {"chosen_logratio_l2"}  # zero while policy == reference; tested in a weighted sum below
PAIRED = sorted(n for n, s in LOSSES.items()
                if s.data == "paired" and not n.startswith("test_") and n not in CONSTRAINTS)


def write_unpaired(path, n=32, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good = i % 2 == 0
            lo, hi = (0, 20) if good else (30, 58)
            row = {"prompt": words(rng, 3), "completion": " " + words(rng, 3, lo, hi), "label": good}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("name", PAIRED)
def test_each_paired_objective_lowers_its_loss(tmp_path, name):
    run = train_dpo(base_config(tmp_path, loss=name, loss_params=PARAMS.get(name, {}), max_steps=12,
                                logging_steps=4, learning_rate=3e-3))
    first, last = run.train.history[0]["loss"], run.train.history[-1]["loss"]
    assert last < first - 1e-3, (name, first, last)


@pytest.mark.parametrize("name", ["simpo", "orpo", "sft"])
def test_reference_free_losses_load_no_reference(tmp_path, monkeypatch, name):
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference model was loaded")

    monkeypatch.setattr(dpo_module, "load_frozen", no_reference)
    run = train_dpo(base_config(tmp_path, loss=name, max_steps=2))
    assert run.reference_mode == "none" and run.reference_cache is None
    with pytest.raises(ValueError, match="uses no reference model"):
        train_dpo(base_config(tmp_path, loss=name, reference="precomputed"))


def test_kto_trains_on_unpaired_data(tmp_path):
    data = write_unpaired(tmp_path / "kto.jsonl")
    run = train_dpo(base_config(tmp_path, loss="kto", train_file=str(data), max_steps=20, logging_steps=5))
    first, last = run.train.history[0], run.train.history[-1]
    assert last["loss"] < first["loss"] and "kto/kl" in last and "dpo/grad_weight" not in last
    # paired losses on unpaired rows (and the reverse) fail before training, naming the field
    with pytest.raises(ValueError, match="loss 'sigmoid' needs preference pairs"):
        train_dpo(base_config(tmp_path, train_file=str(data), output_dir=str(tmp_path / "paired")))
    with pytest.raises(ValueError, match="loss 'kto' needs unpaired rows"):
        train_dpo(base_config(tmp_path, loss="kto", output_dir=str(tmp_path / "unpaired")))


def test_weighted_sum_with_constraint_term(tmp_path):
    """{sigmoid: 1, chosen_logratio_l2: w}: the penalty keeps the chosen log-ratio nearer zero."""
    def chosen_logratio(weight):
        run = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / f"w{weight}"), max_steps=15,
                                    loss={"sigmoid": 1.0, "chosen_logratio_l2": weight},
                                    loss_params={"beta": 0.5}))
        last = run.train.history[-1]
        assert "loss/sigmoid" in last and "loss/chosen_logratio_l2" in last
        return abs(last["rewards/chosen"])

    assert chosen_logratio(5.0) < chosen_logratio(0.0)


def test_user_registered_loss_is_used(tmp_path):
    from preftune.losses import LossOutput, register_loss

    calls = []

    @register_loss("test_margin_hinge")
    def margin_hinge(inputs, *, beta: float = 0.1, margin: float = 1.0):
        chosen, rejected = inputs.logratios()
        calls.append(1)
        loss = (margin - beta * (chosen - rejected)).clamp(min=0)
        return LossOutput(loss, (beta * chosen).detach(), (beta * rejected).detach())

    try:
        run = train_dpo(base_config(tmp_path, loss="test_margin_hinge", loss_params={"margin": 2.0},
                                    max_steps=3))
        assert calls and run.train.history[0]["loss"] == pytest.approx(2.0)
    finally:
        del LOSSES["test_margin_hinge"]


def test_reward_model_learns_and_scores(tmp_path):
    from preftune.methods.reward import train_reward
    from preftune.rewards.reward_model import score

    cfg = base_config(tmp_path, output_dir=str(tmp_path / "rm"), max_steps=40, logging_steps=10,
                      eval_file=str(tmp_path / "train.jsonl"))
    result = train_reward(cfg)
    assert result.history[-1]["rewards/accuracies"] > 0.9
    assert result.eval_history[-1]["eval/rewards/accuracies"] > 0.9
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    chosen = score(str(result.final_dir), [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = score(str(result.final_dir), [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    # the score API reproduces what training measured on the same pairs
    measured = result.eval_history[-1]
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(measured["eval/rewards/accuracies"])
    # the same fp32 scores by other batches and summed in another order: ~1e-7 relative; 1e-4 of it
    assert sum(margins) / len(margins) == pytest.approx(measured["eval/rewards/margins"], rel=1e-4)
    assert sum(chosen) / len(chosen) == pytest.approx(measured["eval/rewards/chosen"], rel=1e-4)


def test_reward_model_rejects_dpo_options(tmp_path):
    from preftune.methods.reward import train_reward

    with pytest.raises(ValueError, match="unknown key 'loss'"):
        train_reward(base_config(tmp_path, loss="sigmoid"))
