"""PPO on real prompts: rounds with fewer samples than ``rollout_batch_size`` (fewer prompts, or
the last round of a pass) have exactly as many minibatches as they fill, none empty; ``preftune
ppo`` runs on Anthropic HH prompts with the defaults and logs reward and KL every step."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from helpers import SHARED_DATA
from preftune.cli import main
from preftune.data.tokenize import TokenizedPair
from preftune.methods.ppo import PPOConfig
from preftune.methods.ppo_rollout import Rollout, RolloutSteps

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.parametrize(("prompts", "rollout", "rounds", "sizes"), [
    (48, 64, 1, [48]),  # fewer prompts than a rollout: the crash of issue 24
    (100, 64, 4, [64, 36, 64, 36]),  # the last round of each pass over the prompts is short
    (128, 64, 3, [64, 64, 64]),
])
def test_round_sizes_follow_the_prompts(prompts, rollout, rounds, sizes):
    config = PPOConfig(train_file="-", reward_fn="sentiment", rollout_batch_size=rollout, num_rollouts=rounds)
    assert config.round_sizes(prompts) == sizes


def _steps(num_prompts: int, rollout: int, batch_size: int, processes: int) -> tuple[RolloutSteps, list[int]]:
    config = PPOConfig(train_file="-", reward_fn="sentiment", rollout_batch_size=rollout, num_rollouts=1,
                       batch_size=batch_size, ppo_epochs=2)
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    steps = RolloutSteps(config, [f"p{i}" for i in range(num_prompts)], None, None, None, tokenizer)
    n = config.round_sizes(num_prompts)[0]
    samples = [TokenizedPair((1, 3 + i % 5), (4,) * (1 + i % 3), ()) for i in range(n)]
    per_token = [torch.zeros(len(s.chosen_ids)) for s in samples]
    steps.rollout = Rollout(0, samples, per_token, per_token, per_token, per_token)
    return steps, [len(s.chosen_ids) for s in samples]


@pytest.mark.parametrize(("num_prompts", "rollout", "batch_size", "processes"), [
    (48, 64, 8, 1), (12, 64, 8, 1), (13, 16, 4, 2), (17, 64, 4, 2), (9, 64, 4, 2),
])
def test_every_step_trains_on_samples_and_each_pass_covers_the_round_once(num_prompts, rollout, batch_size,
                                                                         processes):
    steps, lengths = _steps(num_prompts, rollout, batch_size, processes)
    total = steps.total_steps(processes)
    per_pass = total // steps.config.ppo_epochs
    for epoch in range(steps.config.ppo_epochs):
        seen: list[int] = []
        for s in range(epoch * per_pass, (epoch + 1) * per_pass):
            plans = [steps.step(s, p, processes) for p in range(processes)]
            for plan in plans:
                assert plan.batches, f"step {s}: a process with nothing to train on"
                assert plan.metrics["ppo/epoch"] == epoch
                seen += [i for b in plan.batches for i in b.forward.indices.tolist()]
            assert plans[0].units == sum(lengths[i] for plan in plans for b in plan.batches
                                         for i in b.forward.indices.tolist())
        assert sorted(seen) == list(range(len(lengths)))  # every sample once per PPO epoch


def _hh_prompts(path, n: int) -> list[str]:
    """The first ``n`` HH dialogues up to and including their last ``\\n\\nAssistant:``."""
    out = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            chosen = json.loads(line)["chosen"]
            cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            out.append(chosen[:cut])
            if len(out) == n:
                break
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in out), encoding="utf-8")
    return out


def test_ppo_runs_on_hh_prompts_with_the_defaults(tmp_path, capsys):
    """12 HH prompts (fewer than the default rollout_batch_size 64), the defaults otherwise, 3 rounds:
    every step logs the rollout's reward and KL, and the run ends with its summary line."""
    if not HH.exists():
        pytest.skip(f"shared data not found at {HH} (CI has ../shared beside the clone)")
    prompts = tmp_path / "prompts.jsonl"
    _hh_prompts(prompts, 12)
    out = tmp_path / "run"
    code = main(["ppo", "--train_file", str(prompts), "--reward_fn", "sentiment", "--num_rollouts", "3",
                 "--logging_steps", "1", "--output_dir", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    steps_per_round = 4 * 2  # ppo_epochs 4 x minibatches of 8 and 4 samples
    assert [r["step"] for r in train] == list(range(1, 3 * steps_per_round + 1))
    for r in train:
        assert {"env/reward", "objective/kl", "objective/kl_coef", "rollout/length"} <= r.keys()
        assert all(map(torch.isfinite, torch.tensor([r["loss"], r["env/reward"], r["objective/kl"]])))
    assert [r["rollout/round"] for r in train[::steps_per_round]] == [0.0, 1.0, 2.0]
    # round 0 samples pi_ref itself: the policy and its frozen copy score the same tokens with the same
    # weights, so each log-ratio is 0 up to fp32 rounding (48 tokens x a few ulps of ~2 nats)
    assert train[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert "done: 24 steps, reward" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()
