"""``preftune eval``: the statistics on hand-made numbers, the leaderboard on a known win table, and one
end-to-end run on the embedded model against a model made by a few DPO steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from preftune.eval.config import EvalConfig
from preftune.eval.evaluate import config_from_mapping, evaluate_models, model_kind, preference_accuracy
from preftune.eval.winrate import (
    compare,
    fit_leaderboard,
    length_controlled,
    logistic_fit,
    reward_preferences,
    swapped_preferences,
    win_table,
)
from preftune.model.hub import EMBEDDED_MODEL


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


# ---- win rate, ties, interval --------------------------------------------------------------------


def test_win_rate_with_ties_by_hand():
    s = reward_preferences([1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 1.0])
    assert s.tolist() == [1.0, 0.5, 0.0, 1.0]
    w = compare(s, np.zeros(4), num_prompts=2)  # prompts (1, 0.5) and (0, 1): means 0.75 and 0.5
    assert w.rate == 0.625 and (w.wins, w.ties, w.losses) == (2, 1, 1)
    assert (w.num_samples, w.num_prompts) == (4, 2)
    # clustered: per-prompt means
    assert w.stderr == pytest.approx(np.std([0.75, 0.5], ddof=1) / math.sqrt(2))
    assert w.agreement is None and w.first_position_rate is None


def test_bootstrap_interval_over_prompts_by_hand():
    # two prompts with means 0.2 and 0.8: a resample of 2 prompts has mean 0.2, 0.5 or 0.8 w.p. 1/4, 1/2, 1/4
    s = np.array([0.2, 0.2, 0.8, 0.8])
    w = compare(s, np.zeros(4), num_prompts=2, level=0.95, num_boot=4000)
    assert (w.low, w.high) == (pytest.approx(0.2), pytest.approx(0.8))
    w = compare(s, np.zeros(4), num_prompts=2, level=0.4, num_boot=4000)  # quantiles 0.3 and 0.7 fall on 0.5
    assert (w.low, w.high) == (pytest.approx(0.5), pytest.approx(0.5))


def test_interval_is_clustered_and_matches_the_normal_one_when_large():
    rng = np.random.default_rng(0)
    one = (rng.random(400) < 0.6).astype(float)
    w1 = compare(one, np.zeros(400), num_prompts=400)
    # copies of a prompt's sample add no information: the interval must not shrink
    w4 = compare(np.repeat(one, 4), np.zeros(1600), num_prompts=400)
    assert (w4.rate, w4.low, w4.high, w4.stderr) == pytest.approx((w1.rate, w1.low, w1.high, w1.stderr))
    assert w1.low == pytest.approx(w1.rate - 1.96 * w1.stderr, abs=0.01)
    assert w1.high == pytest.approx(w1.rate + 1.96 * w1.stderr, abs=0.01)


def test_position_swap_agreement_by_hand():
    sw = swapped_preferences([0.9, 0.8, 0.6, 0.3], [0.2, 0.7, 0.3, 0.6])
    assert sw.preference.tolist() == pytest.approx([0.85, 0.55, 0.65, 0.35])  # (p_ab + 1 - p_ba) / 2
    assert sw.agreement == 0.75  # sample 2: a wins shown first, b wins shown first
    assert sw.first_position_rate == pytest.approx(np.mean([0.55, 0.75, 0.45, 0.45]))
    # a judge that always prefers what it sees first: swapping turns every verdict into a tie
    biased = swapped_preferences([1.0] * 3, [1.0] * 3)
    assert (biased.preference.tolist() == [0.5] * 3 and biased.agreement == 0.0
            and biased.first_position_rate == 1.0)
    w = compare(biased.preference, np.zeros(3), num_prompts=3, swapped=biased)
    assert w.rate == 0.5 and w.ties == 3 and w.agreement == 0.0
    with pytest.raises(ValueError, match="probabilities"):
        swapped_preferences([1.5], [0.0])


# ---- length control --------------------------------------------------------------------------------


def test_logistic_fit_by_hand():
    # intercept only: theta_0 = logit(mean y) = log 3
    theta = logistic_fit(np.ones((4, 1)), np.array([1.0, 0.0, 1.0, 1.0]))
    assert theta[0] == pytest.approx(math.log(3), abs=1e-9)
    # fractional targets lying exactly on a logistic curve are fitted exactly
    x = np.stack([np.ones(5), np.linspace(-2, 2, 5)], axis=1)
    assert logistic_fit(x, _sigmoid(0.3 - 0.7 * x[:, 1])) == pytest.approx([0.3, -0.7], abs=1e-8)
    # batched weights: a row of counts equals repeating the rows
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    batched = logistic_fit(x, y, np.array([[1, 1, 1, 1, 1], [2, 0, 1, 1, 3]], dtype=float))
    repeated = logistic_fit(x[[0, 0, 2, 3, 4, 4, 4]], y[[0, 0, 2, 3, 4, 4, 4]])
    assert batched[1] == pytest.approx(repeated, abs=1e-8)


def test_length_controlled_rate_recovers_a_known_intercept():
    d = np.array([-6.0, -2.0, 0.0, 1.0, 3.0, 5.0, 8.0, 12.0])  # tokens; z = d / sd(d)
    z = d / np.std(d, ddof=1)
    lc = length_controlled(_sigmoid(0.4 + 1.5 * z), d)
    assert lc.rate == pytest.approx(float(_sigmoid(0.4)), abs=1e-3)  # ridge 1e-4 on the slope only
    assert lc.slope == pytest.approx(1.5, abs=5e-3) and lc.length_sd == pytest.approx(np.std(d, ddof=1))
    # a judge that ignores length: LC = the raw win rate, slope 0
    flat = length_controlled(np.full(8, 0.7), d)
    assert flat.rate == pytest.approx(0.7, abs=1e-9) and abs(flat.slope) < 1e-9
    # no length variation: the intercept alone, LC = W
    assert length_controlled(np.array([1.0, 0.0, 1.0, 0.5]), np.zeros(4)).rate == pytest.approx(0.625)


def test_preference_explained_by_length_has_lc_win_rate_one_half():
    rng = np.random.default_rng(1)
    d = rng.normal(4.0, 4.0, 4000)  # model a writes longer samples
    p = _sigmoid(2.0 * d / np.std(d, ddof=1))  # the judge only looks at length: true intercept 0
    u = rng.random(4000)
    s = np.where(u < p - 0.05, 1.0, np.where(u < p + 0.05, 0.5, 0.0))  # ties included
    w = compare(s, d, num_prompts=1000, num_boot=500)
    assert w.rate > 0.75
    assert w.lc_rate == pytest.approx(0.5, abs=0.03) and w.lc_low < 0.5 < w.lc_high
    assert w.length_slope > 1.5


# ---- leaderboard and accuracy --------------------------------------------------------------------


def test_leaderboard_on_a_known_win_table():
    # true strengths base = 1, A = 4, B = 2; each pair's wins are in the exact ratio, so the MLE is the truth
    prefs = {(1, 0): [0.8] * 10, (2, 0): [1.0, 1.0, 0.0] * 4, (1, 2): [1.0, 0.5, 0.5] * 4}
    wins = win_table(3, prefs)
    assert wins == pytest.approx(np.array([[0, 2, 4], [8, 0, 8], [8, 4, 0]]))
    board = fit_leaderboard(["base", "A", "B"], wins, baseline=0, judge="j")
    assert [r.name for r in board.rows] == ["A", "B", "base"] and [r.rank for r in board.rows] == [1, 2, 3]
    a, b, base = board.rows
    assert a.strength == pytest.approx(4.0, abs=1e-6) and b.strength == pytest.approx(2.0, abs=1e-6)
    assert a.p_beats_baseline == pytest.approx(0.8, abs=1e-6)
    assert b.p_beats_baseline == pytest.approx(2 / 3, abs=1e-6)
    assert a.low < 4.0 < a.high and b.p_low < 2 / 3 < b.p_high
    assert base.strength == 1.0 and (a.wins, a.losses) == (16, 6)
    assert board.prior == 0.0 and board.note == ""
    # two players, 3 wins to 1: the Wald interval of the log-ratio by hand, se^2 = 1 / (n p q)
    two = fit_leaderboard(["base", "m"], np.array([[0.0, 1.0], [3.0, 0.0]]))
    m = two.rows[0]
    se = math.sqrt(1 / (4 * 0.75 * 0.25))
    assert m.strength == pytest.approx(3.0) and m.low == pytest.approx(3 * math.exp(-1.959964 * se), rel=1e-5)
    # a model that never loses: no MLE, refitted with a prior and said so
    sweep = fit_leaderboard(["base", "m"], np.array([[0.0, 0.0], [5.0, 0.0]]))
    assert sweep.prior == 1.0 and "does not exist" in sweep.note and sweep.rows[0].name == "m"


def test_preference_accuracy_by_hand():
    acc, se = preference_accuracy([1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 0.25])
    assert acc == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)  # tie 1/2; soft label 0.25 on a positive margin
    assert se == pytest.approx(math.sqrt(acc * (1 - acc) / 4))


def test_model_kind_and_config_errors(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    assert model_kind(str(rm)) == "reward_model" and model_kind("embedded") == "policy"
    with pytest.raises(FileNotFoundError, match="no model directory"):
        EvalConfig(models=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="num_samples"):
        EvalConfig(models=["embedded"], num_samples=0)
    with pytest.raises(ValueError, match="did you mean 'num_samples'"):
        config_from_mapping({"models": ["embedded"], "num_sample": 2})


def test_cli_error_is_one_line(tmp_path, capsys):
    from preftune.cli import main

    config = tmp_path / "eval.yaml"
    config.write_text("models: [embedded]\nlevel: 1.5\n")
    assert main(["eval", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune eval: error: eval: level") and "\n" not in err
    assert main(["eval", "--models", str(tmp_path / "nope")]) == 2
    assert "no model directory" in capsys.readouterr().err


# ---- end to end on the embedded model -------------------------------------------------------------


def longer_wins(prompts, first, second):
    """A pairwise judge for the tests: the longer text wins; equal lengths tie."""
    return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]


needs_embedded = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                    reason="embedded model missing")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A model from 4 DPO steps on the embedded model, a fresh reward model, and `preftune eval` of both
    (plus the embedded model itself) against the embedded baseline, from the command line."""
    from helpers import write_pairs
    from preftune.cli import main
    from preftune.methods.dpo import train_dpo
    from preftune.model.load import load_tokenizer
    from preftune.rewards.reward_model import load_reward_model

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("eval")
    pairs = write_pairs(tmp / "pairs.jsonl", n=16)
    dpo = train_dpo({"model": "embedded", "train_file": str(pairs), "output_dir": str(tmp / "dpo"),
                     "batch_size": 8, "max_steps": 4, "learning_rate": 2e-3, "progress_bar": False,
                     "gradient_checkpointing": False, "loss_params": {"beta": 0.1}})
    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    load_reward_model("embedded", pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp / "rm")
    tokenizer.save_pretrained(tmp / "rm")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Once upon a time, there was a cat.", "Tom had a red ball.",
                                "The sun was hot.", "Lily went to the park.", "A big dog barked."]))
    module = "test_eval_command:longer_wins"
    argv = ["eval", "--models", str(dpo.train.final_dir), "embedded", str(tmp / "rm"),
            "--baseline", "embedded", "--prompts", str(prompts), "--pairs", str(pairs),
            "--judge", "sentiment", "--pairwise-judge", module, "--num_samples", "3",
            "--max_new_tokens", "12", "--bootstrap", "300", "--output_dir", str(tmp / "out")]
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(previous)
    return tmp / "out", json.loads((tmp / "out" / "eval.json").read_text())


@needs_embedded
def test_eval_writes_its_files_and_keys(run, capsys):
    out, result = run
    for name in ("eval.json", "report.md", "samples.jsonl", "win_rates.png", "reward_kl.png", "lengths.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "win_rates.png").read_bytes()[:4] == b"\x89PNG"
    names = [m["name"] for m in result["models"]]
    assert names == ["embedded", "dpo/final", "embedded#2", "rm"]
    assert [m["kind"] for m in result["models"]] == ["policy", "policy", "policy", "reward_model"]
    assert result["primary_judge"] == "test_eval_command:longer_wins" and result["num_prompts"] == 5
    for key in ("leaderboard", "summary", "settings", "files", "notes", "prompt_source", "wall_time_s"):
        assert key in result, key
    dpo = result["models"][1]
    assert set(dpo["win_rates"]) == {"sentiment", "test_eval_command:longer_wins"}
    assert {"rate", "low", "high", "lc_rate", "lc_low", "lc_high", "agreement", "first_position_rate"} <= set(
        dpo["win_rates"]["test_eval_command:longer_wins"])
    assert dpo["kl"] > 0
    assert dpo["length_drift"] == pytest.approx(dpo["length"] - result["models"][0]["length"])
    assert dpo["accuracy"]["num_pairs"] == 16 and dpo["accuracy"]["source"] == "implicit reward"
    assert result["models"][3]["accuracy"]["source"] == "reward model" and result["models"][3]["kl"] is None
    board = result["leaderboard"]["rows"]
    assert sorted(r["name"] for r in board) == ["dpo/final", "embedded", "embedded#2"]
    assert [r["strength"] for r in board] == sorted((r["strength"] for r in board), reverse=True)
    report = (out / "report.md").read_text()
    for text in ("## Summary", "## Win rate against the baseline", "## Bradley-Terry leaderboard",
                 "## Preference accuracy on pairs", "win_rates.png", "dpo/final"):
        assert text in report, text


@needs_embedded
def test_eval_figures_follow_from_its_samples(run):
    out, result = run
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3
    base, dpo, same = result["models"][:3]
    # the embedded model evaluated as a model: the same seeds give the same samples as the baseline
    assert all(r["outputs"]["embedded#2"] == r["outputs"]["embedded"] for r in rows)
    # exactly: the same weights score the same samples with the same kernels (and ties count 1/2)
    assert same["kl"] == 0.0 and same["accuracy"]["accuracy"] == 0.5
    assert same["win_rates"]["sentiment"]["rate"] == 0.5 and same["win_rates"]["sentiment"]["lc_rate"] == 0.5
    # the DPO model's win rate and LC rate, recomputed from the paired samples
    r_dpo = [r["outputs"]["dpo/final"]["reward"] for r in rows]
    r_base = [r["outputs"]["embedded"]["reward"] for r in rows]
    s = reward_preferences(r_dpo, r_base)
    d = np.array([r["outputs"]["dpo/final"]["tokens"] - r["outputs"]["embedded"]["tokens"] for r in rows],
                 float)
    w = dpo["win_rates"]["sentiment"]
    assert w["rate"] == pytest.approx(s.mean())
    assert w["lc_rate"] == pytest.approx(length_controlled(s, d).rate)
    texts = ([r["outputs"]["dpo/final"]["text"] for r in rows],
             [r["outputs"]["embedded"]["text"] for r in rows])
    sw = swapped_preferences(longer_wins(None, *texts), longer_wins(None, *texts[::-1]))
    pw = dpo["win_rates"]["test_eval_command:longer_wins"]
    assert pw["rate"] == pytest.approx(sw.preference.mean())
    assert pw["agreement"] == pytest.approx(sw.agreement)
    assert base["length"] == pytest.approx(np.mean([r["outputs"]["embedded"]["tokens"] for r in rows]))


@needs_embedded
def test_python_api_with_callable_judges_and_openings(tmp_path):
    result = evaluate_models({"models": ["embedded"], "judge": None, "pairwise_judge": longer_wins,
                              "num_prompts": 2, "num_samples": 2, "max_new_tokens": 4, "bootstrap": 50,
                              "output_dir": str(tmp_path), "threads": 1})
    assert result.prompt_source.startswith("2 held-out TinyStories openings") and result.num_prompts == 2
    w = result.models[1].win_rates["longer_wins"]
    # identical samples: every verdict a tie, both orders
    assert (w.rate, w.ties, w.agreement) == (0.5, 4, 1.0)
    assert result.models[1].reward is None and result.leaderboard is not None
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["pairwise_judge"] == "longer_wins"
