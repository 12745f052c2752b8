"""Iterative DPO: the pair builder, the reference rules, a 2-round run that learns, mid-round resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import save_tiny_model, tensorboard_scalars
from preftune.methods.iterate import IterateConfig, Iteration, ema_reference
from preftune.methods.iterate_pairs import PairStats, borda_scores, build_pairs


def test_best_worst_pairs_drop_ties_and_identical_texts():
    stats = PairStats()
    rows = build_pairs("p", ["a", "b", "c"], [0.1, 0.9, -0.3], "best_worst", 0.0, stats)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "c")]
    assert build_pairs("p", ["a", "b"], [0.5, 0.5], "best_worst", 0.0, stats) == []  # a tie
    assert build_pairs("p", ["a", "a", "b"], [0.9, 0.1, 0.1], "best_worst", 0.0, stats)[0]["rejected"] == "b"
    assert build_pairs("p", ["x", "x"], [0.9, 0.1], "best_worst", 0.0, stats) == []  # same text twice
    assert (stats.prompts, stats.pairs, stats.ties, stats.identical) == (4, 2, 1, 1)


def test_all_pairs_above_a_gap():
    stats = PairStats()
    rows = build_pairs("p", ["a", "b", "c", "d"], [0.0, 0.5, 0.55, 1.0], "all_pairs", 0.1, stats)
    got = sorted((r["chosen"], r["rejected"]) for r in rows)
    assert got == [("b", "a"), ("c", "a"), ("d", "a"), ("d", "b"), ("d", "c")]
    assert stats.ties == 1  # b vs c: gap 0.05 <= 0.1, counted once
    assert all(r["chosen_score"] - r["rejected_score"] > 0.1 for r in rows)


def test_pairwise_judge_scores_are_mean_win_probabilities():
    def judge(prompts, first, second):  # longer text wins with probability 0.8, equal length 0.5
        return [0.8 if len(a) > len(b) else 0.2 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]

    scores = borda_scores(judge, "p", ["aaa", "a", "aa"])
    assert scores == pytest.approx([0.8, 0.2, 0.5])


def test_reference_rules(tmp_path):
    save_tiny_model(tmp_path / "ref", seed=0)
    save_tiny_model(tmp_path / "policy", seed=1)
    ema_reference(tmp_path / "policy", str(tmp_path / "ref"), 0.25, tmp_path / "ema")
    a, p, r = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ema", "policy", "ref"))
    for k in a:  # fp32 weights of size ~0.1 mixed by another formula: an ulp or two (the default tolerance)
        torch.testing.assert_close(a[k], 0.25 * p[k] + 0.75 * r[k])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "w1"}\n')
    for rule, expected in (("initial", "ref"), ("previous", "policy")):
        config = IterateConfig(train_file=str(tmp_path / "prompts.jsonl"), judge="sentiment", reference=rule,
                               model=str(tmp_path / "ref"))
        it = Iteration(config, prompts=["w1"])
        assert it.next_reference(2, str(tmp_path / "policy"), str(tmp_path / "ref"),
                                 tmp_path) == str(tmp_path / expected)


@pytest.mark.parametrize("values,message", [
    ({"judge": None}, "exactly one of judge"),
    ({"pair_strategy": "random"}, "pair_strategy must be one of"),
    ({"reference": "frozen"}, "reference must be one of"),
    ({"dpo": {"model": "x"}}, "dpo.model is set by iterate"),
    ({"dpo": {"lerning_rate": 1.0}}, "unknown key 'lerning_rate'"),
    ({"eval_file": "e.jsonl"}, "eval_file needs eval_reward"),
    ({"reference_ema": 0.3}, "reference_ema has no effect without reference: ema"),
])
def test_bad_iterate_config(values, message):
    with pytest.raises(ValueError, match=message):
        IterateConfig(**{"train_file": "p.jsonl", "judge": "sentiment", **values})


def _embedded_setup(tmp_path):
    from preftune.data.openings import load_openings, split_prompts

    train, held = split_prompts(load_openings(), 48, 12, 0)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    return train, {"rounds": 2, "samples_per_prompt": 4, "max_new_tokens": 16,
                   "eval_file": str(tmp_path / "eval.jsonl"), "eval_reward": "sentiment",
                   "judge": "sentiment", "eval_samples": 4,
                   "dpo": {"learning_rate": 3e-4, "epochs": 2, "batch_size": 16,
                           "gradient_checkpointing": False, "progress_bar": False, "max_length": 128,
                           "max_prompt_length": 96, "save_steps": 3, "report_to": "tensorboard",
                           "reference_cache_dir": str(tmp_path / "cache")}}


def test_two_rounds_raise_the_ground_truth_reward_and_resume_mid_round(tmp_path, monkeypatch):
    import preftune.methods.dpo as dpo_module
    from preftune.methods.iterate import train_iterative

    torch.set_num_threads(1)
    prompts, settings = _embedded_setup(tmp_path)
    whole = train_iterative({**settings, "output_dir": str(tmp_path / "whole")}, prompts=prompts)
    rounds = whole.rounds
    # round 0's policy is the initial model: the same weights score the same samples with the same kernels,
    # so its KL estimate is exactly 0
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[0]["eval/kl"] == 0.0
    assert rounds[2]["eval/reward"] > rounds[0]["eval/reward"] + 0.1
    # round 2 samples the improved policy
    assert rounds[2]["mean_judge_score"] > rounds[1]["mean_judge_score"]
    for rnd in (1, 2):
        for name in ("samples.jsonl", "pairs.jsonl", "eval.json", "final/model.safetensors"):
            assert (tmp_path / "whole" / f"round_{rnd}" / name).exists(), name
    assert len((tmp_path / "whole" / "iterate.jsonl").read_text().splitlines()) == 3

    # interrupted in round 2's DPO run (after a checkpoint), then resumed: the same final weights
    real, calls = dpo_module.train_dpo, []

    def flaky(config, **kwargs):
        calls.append(config.output_dir)

        def crash(step, _metrics):
            if len(calls) == 2 and step == 4:
                raise KeyboardInterrupt

        return real(config, callbacks=[crash], **kwargs)

    monkeypatch.setattr(dpo_module, "train_dpo", flaky)
    cut = {**settings, "output_dir": str(tmp_path / "cut")}
    with pytest.raises(KeyboardInterrupt):
        train_iterative(cut, prompts=prompts)
    monkeypatch.setattr(dpo_module, "train_dpo", real)
    resumed = train_iterative({**cut, "resume": True}, prompts=prompts)
    a = load_file(str(whole.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: the same process, one thread, same batches
    # wall times differ, and a resumed round counts only the tokens it trained after the resume
    timing = ("train_wall_time_s", "train_tokens")
    timeless = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert timeless(resumed.rounds) == timeless(whole.rounds)
    # one TensorBoard run per round; the resumed round's holds each step once, as metrics.jsonl does
    for run_dir in (tmp_path / "whole", tmp_path / "cut"):
        for rnd in (1, 2):
            rows = [json.loads(line) for line in (run_dir / f"round_{rnd}" / "metrics.jsonl").open()]
            logged = tensorboard_scalars(run_dir / f"round_{rnd}" / "tensorboard")["loss"]
            expected = {r["step"]: r["loss"] for r in rows if "loss" in r}
            assert logged == pytest.approx(expected), (run_dir, rnd)


def test_k_samples_share_one_prompt_pass_and_equal_repeated_prompts(monkeypatch):
    """The prompt's KV cache is computed once for its k samples; the samples equal those drawn with the
    prompt repeated k times (same seeds)."""
    from preftune.data.openings import load_openings
    from preftune.model import generation
    from preftune.model.load import load_model, load_tokenizer

    tokenizer, model = load_tokenizer("embedded"), load_model("embedded").eval()
    prompts = load_openings()[:6]
    calls = []
    real = generation._shared_prompt_cache

    def spy(model_, input_ids, mask, k):
        calls.append((input_ids.shape[0], k))
        return real(model_, input_ids, mask, k)

    monkeypatch.setattr(generation, "_shared_prompt_cache", spy)
    shared = generation.sample_continuations(model, tokenizer, prompts, num_samples=4, max_new_tokens=12,
                                             seed=5)
    assert calls == [(6, 4)]  # one prefill row per prompt, repeated 4 times
    monkeypatch.setattr(generation, "_shared_prompt_cache", lambda *args: {})
    repeated = generation.sample_continuations(model, tokenizer, prompts, num_samples=4, max_new_tokens=12,
                                               seed=5)
    assert shared == repeated


def test_a_used_output_dir_is_refused_without_resume_or_overwrite(tmp_path):
    from preftune.methods.iterate import train_iterative

    (tmp_path / "out" / "round_1").mkdir(parents=True)
    config = {"output_dir": str(tmp_path / "out"), "judge": "sentiment", "rounds": 1}
    with pytest.raises(ValueError, match="already holds an iteration"):
        train_iterative(config, prompts=["Once upon a time"])
    with pytest.raises(ValueError, match="exclude each other"):
        train_iterative({**config, "resume": True, "overwrite": True}, prompts=["Once upon a time"])
