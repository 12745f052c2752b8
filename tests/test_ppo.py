"""PPO on the loop: it raises a reward while the KL controller holds KL, resumes exactly, takes every
reward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import save_tiny_model, tensorboard_scalars, write_pairs
from preftune.methods.ppo import PPOConfig, train_ppo
from preftune.methods.ppo_rollout import Rollout

PROMPTS = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(3)) for i in range(24)]


def low_words(prompts, completions):
    """A toy reward: the share of words w0..w9 in the completion."""
    return [sum(w in {f"w{k}" for k in range(10)} for w in c.split()) / max(1, len(c.split()))
            for c in completions]


def tiny_config(tmp, **overrides):
    if not (tmp / "model").exists():
        save_tiny_model(tmp / "model")
    config = {"model": str(tmp / "model"), "output_dir": str(tmp / "out"), "rollout_batch_size": 8,
              "num_rollouts": 3, "batch_size": 4, "ppo_epochs": 2, "learning_rate": 3e-3, "max_new_tokens": 6,
              "logging_steps": 1, "progress_bar": False, "gradient_checkpointing": False}
    config.update(overrides)
    return config


def test_ppo_raises_the_reward_while_kl_stays_in_the_target_band(tmp_path):
    """The embedded model, VADER sentiment as the reward, an adaptive KL coefficient aiming at 3 nats."""
    from preftune.data.openings import load_openings

    torch.set_num_threads(1)
    steps_per_round = 4  # 2 PPO epochs x 2 minibatches of 16
    run = train_ppo({"output_dir": str(tmp_path / "out"), "rollout_batch_size": 32, "num_rollouts": 10,
                     "batch_size": 16, "ppo_epochs": 2, "learning_rate": 3e-4, "max_new_tokens": 24,
                     "logging_steps": steps_per_round, "progress_bar": False, "kl_coef": 0.1,
                     "kl_target": 3.0, "kl_horizon": 128, "gradient_checkpointing": False,
                     "reward_fn": "sentiment"},
                    prompts=load_openings()[:64])
    rounds = run.train.history  # one row per round
    assert [r["rollout/round"] for r in rounds] == list(range(10))
    # sampled from pi_ref itself: per-sequence sums of log pi - log pi_ref over <= 24 tokens, each within
    # an ulp or so of ~5 nats (~5e-7) where the two scorings round differently; the mean of 32 rows
    assert rounds[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    late = sum(r["env/reward"] for r in rounds[-3:]) / 3
    assert late > rounds[0]["env/reward"] + 0.15
    assert max(r["objective/kl"] for r in rounds) < 1.5 * 3.0
    assert rounds[-1]["objective/kl_coef"] < 0.1  # KL stayed below target: the controller loosened
    for key in ("objective/entropy", "ppo/clipfrac", "loss/value", "val/explained_variance", "ppo/approx_kl",
                "rollout/length", "env/score"):
        assert key in rounds[-1]


def test_first_update_starts_at_ratio_one(tmp_path):
    run = train_ppo(tiny_config(tmp_path, num_rollouts=1, report_to="tensorboard"), prompts=PROMPTS,
                    reward_fn=low_words)
    logged = tensorboard_scalars(tmp_path / "out" / "tensorboard")  # PPO reports as every method does
    assert logged["env/score"] == pytest.approx({r["step"]: r["env/score"] for r in run.train.history})
    first = run.train.history[0]
    # the update's token log-probs against the rollout's, the same weights: ~1 ulp of ~5 nats (~5e-7)
    # apart where the batches round differently, so ratio 1 to ~5e-7 and approx_kl (their square) ~1e-13
    assert first["ppo/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-8) and first["ppo/clipfrac"] == 0.0
    assert run.train.steps == 1 * 2 * 2  # rounds x epochs x minibatches


def test_resume_mid_round_gives_identical_weights(tmp_path):
    settings = dict(save_steps=3, kl_target=1.0, kl_horizon=16)  # 4 steps a round: checkpoint 3 is mid-round
    whole = train_ppo(tiny_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings), prompts=PROMPTS,
                      reward_fn=low_words)

    def crash(step, _metrics):
        if step == 8:
            raise KeyboardInterrupt

    cut = tiny_config(tmp_path, output_dir=str(tmp_path / "cut"), **settings)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(cut, prompts=PROMPTS, reward_fn=low_words, callbacks=[crash])
    assert (tmp_path / "cut" / "checkpoint-6").is_dir()
    resumed = train_ppo({**cut, "resume": True}, prompts=PROMPTS, reward_fn=low_words)
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = (load_file(str(r.train.final_dir / name)) for r in (whole, resumed))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)  # bitwise: the same process, kernels and batches
    assert resumed.train.history[-1] == {**whole.train.history[-1], "tokens_per_s": resumed.train.history[-1][
        "tokens_per_s"]}


def test_rollout_state_round_trip():
    from preftune.data.tokenize import TokenizedPair

    rollout = Rollout(3, [TokenizedPair((1, 5), (7, 8, 2), ()), TokenizedPair((1,), (9,), ())],
                      *([torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4])] for _ in range(4)),
                      metrics={"x": 1.0})
    back = Rollout.from_state(rollout.state_dict())
    assert back.round == 3 and back.samples == rollout.samples and back.metrics == {"x": 1.0}
    for a, b in zip(back.advantages, rollout.advantages):
        assert torch.equal(a, b)


def test_reward_model_and_reference_ema(tmp_path):
    from preftune.methods.reward import train_reward

    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "pairs.jsonl")
    rm = train_reward({"model": str(tmp_path / "model"), "train_file": str(tmp_path / "pairs.jsonl"),
                       "output_dir": str(tmp_path / "rm"), "max_steps": 2, "progress_bar": False,
                       "logging_steps": 1, "report_to": "tensorboard"})
    logged = tensorboard_scalars(tmp_path / "rm" / "tensorboard")  # the reward model reports too
    accuracies = {r["step"]: r["rewards/accuracies"] for r in rm.history}
    assert logged["rewards/accuracies"] == pytest.approx(accuracies)
    run = train_ppo(tiny_config(tmp_path, num_rollouts=2, reward_model=str(rm.final_dir), reference_ema=0.5),
                    prompts=PROMPTS)
    assert all(r["env/reward"] == r["env/reward"] for r in run.train.history)  # finite, from the reward model
    ref = load_file(str(run.train.final_dir / "reference_ema.safetensors"))
    base = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert any(not torch.equal(ref[k], base[k]) for k in base)  # the reference moved towards the policy


def test_penalties_enter_the_score(tmp_path):
    run = train_ppo(tiny_config(tmp_path, num_rollouts=1, missing_eos_penalty=1.0, length_penalty=0.1),
                    prompts=PROMPTS, reward_fn=lambda p, c: [0.0] * len(c))
    row = run.train.history[0]
    expected = -0.1 * row["rollout/length"] - 1.0 * (1 - row["rollout/stopped"])
    # the mean of fp32 scores of size ~1 against the same formula on the logged fp32 means: ~1e-7 apart
    assert row["env/reward"] == 0.0 and row["env/score"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("override,message", [
    ({"max_steps": 3}, "set num_rollouts instead of max_steps"),
    ({"reward_model": "x", "reward_fn": "sentiment"}, "not both"),
    ({"kl_estimator": "k2"}, "kl_estimator must be one of"),
    ({"layout": "padded"}, "prefix_shared"),
    ({"reference_ema": 0.5, "lora": True}, "reference_ema needs a full-weight policy"),
    ({"reference": "adapter"}, "needs lora: true"),
    ({"clip_range": 0.0}, "clip_range out of range"),
    ({"eval_file": "e.jsonl"}, "eval_file has no effect in PPO"),
    ({"max_length": 256}, "max_length has no effect in PPO"),
])
def test_bad_ppo_config_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(train_file="p.jsonl", **override)


def test_cli_ppo_on_a_prompt_file(tmp_path, capsys):
    from preftune.cli import main

    save_tiny_model(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    code = main(["ppo", "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "prompts.jsonl"),
                 "--reward_fn", "test_ppo:low_words", "--num_rollouts", "1", "--rollout_batch_size", "8",
                 "--batch_size", "8", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out"),
                 "--progress_bar", "false"])
    assert code == 0 and "reward" in capsys.readouterr().out
    assert main(["ppo", "--train_file", str(tmp_path / "prompts.jsonl")]) == 2  # no reward: one clear line
    assert "needs a reward" in capsys.readouterr().err
