"""``preftune demo`` end to end on the embedded model, small and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.data.openings import load_openings, split_prompts
from preftune.lab.demo import (
    TRAIN_STREAM,
    DemoOptions,
    DemoResult,
    build_parser,
    labelled_pairs,
    main,
    run_demo,
)
from preftune.model.generation import kl_estimate, sample_continuations
from preftune.model.hub import EMBEDDED_MODEL
from preftune.model.load import load_model, load_tokenizer
from preftune.rewards.annotator import read_pairs_jsonl

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                 reason="embedded model missing")]

SMALL = dict(num_prompts=256, eval_prompts=32, eval_samples=4, max_new_tokens=24, steps=32, batch_size=16,
             learning_rate=5e-4, seed=0, num_examples=3, progress_bar=False)




@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    options = DemoOptions(output_dir=str(tmp_path_factory.mktemp("demo")), **SMALL)
    return options, run_demo(options)


def test_demo_raises_the_ground_truth_reward_and_writes_its_report(demo):
    options, result = demo
    # about +0.5 here; demand clearly more than the noise (std. errors ~0.03)
    assert result.reward_after > result.reward_before + 0.15
    assert result.win_rate > 0.5
    assert result.kl > 0
    assert 0.0 <= result.heldout_accuracy <= 1.0
    assert result.num_train_pairs > 0.8 * options.num_prompts
    out = Path(options.output_dir)
    for name in ("report.md", "metrics.jsonl", "train_pairs.jsonl", "heldout_pairs.jsonl", "samples.jsonl",
                 "training.png", "rewards.png", "result.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "win rate" in report and "KL" in report and "pi_theta" in report
    assert json.loads((out / "result.json").read_text())["win_rate"] == result.win_rate
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/rewards/accuracies" in row for row in metrics)


def test_same_seed_gives_the_same_labelled_dataset(demo):
    options, _ = demo
    tokenizer, model = load_tokenizer("embedded"), load_model("embedded").eval()
    train_prompts, _ = split_prompts(load_openings(), options.num_prompts, options.eval_prompts, options.seed)
    again = labelled_pairs(model, tokenizer, train_prompts, options, TRAIN_STREAM)
    assert again == read_pairs_jsonl(Path(options.output_dir) / "train_pairs.jsonl")
    other = labelled_pairs(model, tokenizer, train_prompts, DemoOptions(**{**SMALL, "seed": 1}), TRAIN_STREAM)
    assert [p.chosen for p in other] != [p.chosen for p in again]


def test_kl_of_a_model_with_itself_is_zero():
    tokenizer, model = load_tokenizer("embedded"), load_model("embedded").eval()
    samples = sample_continuations(model, tokenizer, load_openings()[:4], num_samples=2, max_new_tokens=8)
    assert [len(group) for group in samples] == [2, 2, 2, 2]
    # one function twice: the same bits
    assert kl_estimate(model, model, [s for g in samples for s in g]).mean == 0.0


def test_cli_flags_map_to_options(tmp_path, monkeypatch, capsys):
    args = build_parser().parse_args(["-n", "10", "--beta", "0.2", "--steps", "3", "--seed", "5",
                                      "--temperature", "0.9", "--max_new_tokens", "7",
                                      "--learning_rate", "1e-4",
                                      "-o", str(tmp_path), "--no-progress_bar"])
    options = DemoOptions(**vars(args))
    assert (options.num_prompts, options.beta, options.steps, options.seed) == (10, 0.2, 3, 5)
    assert (options.temperature, options.max_new_tokens, options.learning_rate) == (0.9, 7, 1e-4)
    assert options.output_dir == str(tmp_path) and options.progress_bar is False
    calls = []
    fake = DemoResult(0.1, 0.01, 0.5, 0.01, 0.8, 2.0, 0.1, 0.05, 0.7, 0.9, 0.95, 10, 4, 8, 1.0,
                      {"train": 0.5}, str(tmp_path))
    monkeypatch.setattr("preftune.lab.demo.run_demo", lambda o: calls.append(o) or fake)
    assert main(["-n", "10"]) == 0
    assert calls[0].num_prompts == 10
    assert "win rate" in capsys.readouterr().out
