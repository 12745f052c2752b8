"""Diagnostics: each warning fires on the pattern it names (provoked in real runs where cheap), once."""

from __future__ import annotations

import json
import math
import random

import pytest

from helpers import base_config, words
from preftune.engine.diagnostics import (
    Diagnostics,
    LengthDrift,
    LikelihoodDisplacement,
    Overfitting,
    StuckAtLog2,
)


def test_each_monitor_on_hand_made_rows():
    lik = LikelihoodDisplacement()
    assert lik.observe({"logps/chosen": -20.0, "rewards/margins": 0.1}) is None
    assert lik.observe({"logps/chosen": -20.5, "rewards/margins": 0.9}) is None  # fell 0.5 < 1 nat
    assert "likelihood displacement" in lik.observe({"logps/chosen": -21.5, "rewards/margins": 0.9})

    over = Overfitting(patience=2)
    rows = [({"rewards/accuracies": 0.6, "rewards/margins": 0.2}, {"eval/rewards/accuracies": 0.60}),
            ({"rewards/accuracies": 0.9, "rewards/margins": 1.0}, {"eval/rewards/accuracies": 0.58}),
            ({"rewards/accuracies": 1.0, "rewards/margins": 2.0}, {"eval/rewards/accuracies": 0.59})]
    said = [over.observe(train) or over.observe(held) for train, held in rows]
    assert said[:2] == [None, None] and "memorising" in said[2]
    flat = Overfitting(patience=2)  # eval flat but training flat too: no warning
    for _ in range(4):
        assert flat.observe({"rewards/accuracies": 0.6, "rewards/margins": 0.2}) is None
        assert flat.observe({"eval/rewards/accuracies": 0.6}) is None

    drift = LengthDrift(tolerance=0.3)
    assert drift.observe({"rollout/length": 20.0}) is None and drift.observe({"rollout/length": 25.0}) is None
    assert "longer" in drift.observe({"rollout/length": 27.0})
    assert LengthDrift().observe({"eval/generation_length": 10.0}) is None  # the first value is the reference
    short = LengthDrift()
    short.observe({"eval/generation_length": 10.0})
    assert "shorter" in short.observe({"eval/generation_length": 6.0})

    stuck = StuckAtLog2(windows=3)
    row = {"loss": math.log(2), "rewards/margins": 0.0}
    assert [stuck.observe(row) for _ in range(2)] == [None, None] and "log 2" in stuck.observe(row)
    assert StuckAtLog2(windows=1).observe({"loss": 0.5, "rewards/margins": 0.3}) is None


def test_diagnostics_fire_once():
    diag = Diagnostics([StuckAtLog2(windows=1)])
    row = {"step": 3, "loss": math.log(2), "rewards/margins": 0.0}
    first = diag.observe(row)
    assert [d.name for d in first] == ["no_learning"] and first[0].row()["step"] == 3
    assert diag.observe(row) == []


def _noisy_pairs(path, n, seed):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": words(rng, 3), "chosen": " " + words(rng, 4),
                                        "rejected": " " + words(rng, 4)}) + "\n" for _ in range(n)))
    return path


def _warnings(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["warning"]: r["message"] for r in rows if "warning" in r}


@pytest.mark.parametrize("schedule,expected", [("constant", "likelihood_displacement"),
                                               ("linear", "overfitting")])
def test_a_dpo_run_on_random_labels_warns(tmp_path, caplog, schedule, expected):
    """Random labels, a high learning rate. Held constant, it makes the margin grow while both
    log-probs fall (displacement); decaying, held-out accuracy (on other random pairs) peaks early
    while the training margin keeps growing (over-fitting)."""
    from preftune.methods.dpo import train_dpo

    _noisy_pairs(tmp_path / "train.jsonl", 16, 1)
    _noisy_pairs(tmp_path / "eval.jsonl", 32, 2)
    run = train_dpo(base_config(tmp_path, max_steps=40, logging_steps=10, eval_steps=10, learning_rate=3e-2,
                                batch_size=4, eval_file=str(tmp_path / "eval.jsonl"), lr_scheduler=schedule))
    said = _warnings(tmp_path / "out")
    assert expected in said and expected in {w.name for w in run.train.warnings}
    assert f"warning ({expected}" in caplog.text
    if expected == "likelihood_displacement":
        assert run.train.history[-1]["logps/chosen"] < run.train.history[0]["logps/chosen"] - 1


def test_a_run_that_cannot_learn_warns_that_loss_is_stuck(tmp_path):
    from preftune.methods.dpo import train_dpo

    train_dpo(base_config(tmp_path, max_steps=4, logging_steps=1, learning_rate=1e-12))
    assert "no_learning" in _warnings(tmp_path / "out")
    assert "no_learning" not in _warnings_after(tmp_path)


def _warnings_after(tmp_path):
    """A healthy run in another directory: no warning."""
    from preftune.methods.dpo import train_dpo

    train_dpo(base_config(tmp_path, max_steps=4, logging_steps=1, output_dir=str(tmp_path / "ok")))
    return _warnings(tmp_path / "ok")


@pytest.mark.parametrize("key", ["rollout/length"])
def test_ppo_length_drift_is_reported(tmp_path, key):
    """PPO rewarded for stopping early: rollouts shorten and the length warning fires."""
    from helpers import save_tiny_model
    from preftune.methods.ppo import train_ppo

    save_tiny_model(tmp_path / "model")
    prompts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(3)) for i in range(16)]
    run = train_ppo({"model": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"),
                     "rollout_batch_size": 16, "num_rollouts": 12, "batch_size": 8, "ppo_epochs": 2,
                     "learning_rate": 1e-2, "max_new_tokens": 8, "logging_steps": 4, "progress_bar": False,
                     "gradient_checkpointing": False, "kl_coef": 0.0},
                    prompts=prompts, reward_fn=lambda p, c: [-float(len(x.split())) for x in c])
    lengths = [r[key] for r in run.train.history]
    assert lengths[-1] < 0.7 * lengths[0]
    assert "length_drift" in _warnings(tmp_path / "out")
