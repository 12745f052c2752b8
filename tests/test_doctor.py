"""The preference-data doctor: `inspect` checks on hand-built files with known answers, flip detection
with a DPO model trained here, annotator aggregation on simulated annotators, and `select`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import base_config, save_tiny_model, tiny_tokenizer, write_pairs
from preftune.cli import main as cli_main
from preftune.data.formats import load_preference_data
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.doctor.checkup import InspectOptions, inspect_data
from preftune.doctor.cli import aggregate_main, inspect_main, select_main
from preftune.doctor.flips import estimate_flips
from preftune.doctor.selection import select_pairs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_rows(path: Path, rows: list) -> Path:
    """One JSON object per line; a str is written as it is (a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


LONG = " ".join(f"w{i}" for i in range(40))


def dirty_rows() -> list:
    near = LONG.replace("w20", "w99")
    return [
        {"prompt": "p1 alpha", "chosen": "good one", "rejected": "bad one"},     # 1
        {"prompt": "  p1   alpha ", "chosen": "good one", "rejected": "bad one"},  # 2: exact repeat of 1
        {"prompt": "p2", "chosen": "yes", "rejected": "no"},                      # 3: conflicts with 4
        {"prompt": "p2", "chosen": "no", "rejected": "yes"},                      # 4
        {"prompt": "p3", "chosen": "same", "rejected": "same"},                   # 5: chosen == rejected
        {"prompt": "p4", "chosen": "   ", "rejected": "something"},               # 6: empty chosen
        {"prompt": "p5", "chosen": "only chosen"},                                # 7: bad (no rejected)
        '{"prompt": "p6", "chosen": ',                                            # 8: bad (broken JSON)
        {"prompt": "p7 the long one here", "chosen": LONG, "rejected": "short reply"},  # 9
        {"prompt": "p7 the long one here", "chosen": near, "rejected": "short reply"},  # 10: near 9
    ]


def test_text_checks_find_duplicates_conflicts_and_bad_rows(tmp_path):
    s = inspect_data(write_rows(tmp_path / "d.jsonl", dirty_rows())).summary["text"]
    assert (s["rows"], s["pairs"]) == (10, 8)
    assert s["formats"] == {"standard": 9, "unparsable": 1}
    assert s["bad_rows"]["rows"] == [7, 8]
    assert "row 7: field 'rejected': missing" in s["bad_rows"]["messages"][0]
    assert s["empty_completions"]["rows"] == [6] and s["chosen_equals_rejected"]["rows"] == [5]
    assert s["exact_duplicates"]["pairs"]["rows"] == [2] and s["exact_duplicates"]["pairs"]["of"] == [1]
    assert s["exact_duplicates"]["prompts"]["groups"] == 3 and s["exact_duplicates"]["prompts"]["excess"] == 3
    assert s["conflicts"]["rows"] == [3, 4] and s["conflicts"]["groups"] == 1
    assert s["near_duplicates"]["pairs"]["rows"] == [2, 10]  # the swapped pair 4 is not a near duplicate


def test_length_bias_values(tmp_path):
    lengths = [(10, 5), (20, 25), (30, 10), (40, 20)]
    rows = [{"prompt": f"p{i}", "chosen": "x" * c, "rejected": "y" * r} for i, (c, r) in enumerate(lengths)]
    b = inspect_data(write_rows(tmp_path / "l.jsonl", rows)).summary["text"]["length_bias"]["chars"]
    # D = 5, -5, 20, 20; s_w^2 = 500/3, s_l^2 = 250/3; sd(D)^2 = 450/3
    assert b["share_chosen_longer"] == 0.75 and b["longer_rule_accuracy"] == 0.75
    assert b["mean_diff"] == pytest.approx(10.0)
    assert b["cohens_d"] == pytest.approx(10 / np.sqrt(125))
    assert b["cohens_dz"] == pytest.approx(10 / np.sqrt(150))


def test_conversational_rows_need_no_tokenizer(tmp_path):
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    s = inspect_data(write_rows(tmp_path / "c.jsonl", [row, row])).summary["text"]
    assert s["formats"] == {"conversational": 2} and s["pairs"] == 2
    assert s["exact_duplicates"]["pairs"]["rows"] == [2]


def test_truncation_counts_and_padding_per_layout(tmp_path):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    rows = [{"prompt": "w1 w2", "chosen": " w3 w4", "rejected": " w5 w6 w7"},           # fits
            {"prompt": "w1 w2 w3 w4 w5 w6", "chosen": " w7", "rejected": " w8"},        # prompt cut
            {"prompt": "w1 w2", "chosen": " w1 w2 w3 w4 w5 w6 w7", "rejected": " w9"},   # chosen cut
            {"prompt": "w1 w2", "chosen": " w1 w2 w3 w4 w5 w6", "rejected": " w1 w2 w3 w4 w5 w7"}]  # same
    path = write_rows(tmp_path / "t.jsonl", rows)
    budgets = Budgets(max_length=8, max_prompt_length=4)
    options = InspectOptions(tokenizer=str(tok_dir), budgets=budgets, batch_size=3)
    t = inspect_data(path, options).summary["tokens"]
    assert t["truncated"]["rows"] == [2, 3, 4]
    assert t["truncated"]["by_part"] == {"prompt": 1, "chosen": 2, "rejected": 1}
    assert t["dropped_identical"]["rows"] == [4]
    same = PairTokenizer(tiny_tokenizer(), budgets).tokenize(load_preference_data(path).pairs)
    assert (same.truncated, same.dropped_identical) == (3, 1)  # what training counts
    # kept (prompt, chosen, rejected) after the budgets: (3,3,4) (4,2,2) (3,5,2), one batch of 3
    pad = t["padding"]
    assert pad["padded"]["padding"] == pytest.approx(10 / 48) and pad["padded"]["positions_per_pair"] == 16
    assert pad["packed"]["padding"] == pytest.approx(10 / 48)
    assert pad["prefix_shared"]["padding"] == pytest.approx(2 / 30)
    assert pad["prefix_shared"]["positions_per_pair"] == 10
    assert t["lengths"]["chosen"]["max"] == 8  # untruncated, EOS included


def test_budgets_and_tokenizer_from_a_training_config(tmp_path):
    save_tiny_model(tmp_path / "m")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tmp_path / 'm'}\nmax_length: 6\nmax_prompt_length: 3\nbatch_size: 2\n"
                      "layout: padded\n")
    path = write_pairs(tmp_path / "p.jsonl", n=8)
    argv = [str(path), "--config", str(config), "--max-length", "7", "--out", str(tmp_path / "o"),
            "--no-plots"]
    assert inspect_main(argv) == 0
    t = json.loads((tmp_path / "o" / "inspect.json").read_text())["tokens"]
    # the flag beats the config
    assert t["budgets"] == {"max_length": 7, "max_prompt_length": 3, "max_completion_length": None}
    assert list(t["padding"]) == ["padded"] and t["batch_size"] == 2
    assert t["truncated"]["count"] > 0


def test_contamination_by_ngrams(tmp_path):
    e1, e3 = "alpha beta gamma delta epsilon zeta", "red green blue cyan magenta yellow"
    eval_path = write_rows(tmp_path / "eval.jsonl", [{"prompt": p, "chosen": "a", "rejected": "b"} for p in (
        e1, "one two three four five six", e3)])
    around = " ".join(f"x{i}" for i in range(10)) + f" {e3} " + " ".join(f"y{i}" for i in range(10))
    train = [e1, "lorem ipsum dolor sit amet consectetur", around, "alpha beta gamma something else entirely"]
    path = write_rows(tmp_path / "train.jsonl", [{"prompt": p, "chosen": "a", "rejected": "b"}
                                                 for p in train])
    c = inspect_data(path, InspectOptions(eval_file=str(eval_path), ngram=3)).summary["contamination"]
    assert c["train_contaminated"]["rows"] == [1, 3]  # 3 holds all of eval prompt 3 inside a longer prompt
    assert c["eval_contaminated"]["rows"] == [1, 3]


def test_write_clean_removes_exactly_what_the_report_lists(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", dirty_rows())
    out, clean = tmp_path / "report", tmp_path / "clean.jsonl"
    drop = "identical,conflict,duplicate,empty_completion,near_duplicate"
    assert inspect_main([str(path), "--out", str(out), "--write-clean", str(clean), "--drop", drop]) == 0
    listed = json.loads((out / "inspect.json").read_text())["clean"]
    log = read_jsonl(tmp_path / "clean.removed.jsonl")
    assert [e["row"] for e in log] == listed["rows"] == [2, 3, 4, 5, 6, 7, 8, 10]
    assert [e["reason"] for e in log] == listed["reasons"] == [
        "duplicate", "conflict", "conflict", "identical", "empty_completion", "bad_row", "bad_row",
        "near_duplicate"]
    kept = read_jsonl(clean)
    assert kept == [dirty_rows()[0], dirty_rows()[8]]
    assert (out / "report.md").read_text().startswith("# Preference data report")
    assert (out / "length_bias.png").stat().st_size > 0


def test_flip_rate_estimate_on_known_margins():
    rng = np.random.default_rng(0)
    m = rng.normal(1.0, 0.6, 1000)
    flipped = rng.choice(1000, 100, replace=False)
    m[flipped] *= -1
    f = estimate_flips(list(range(1000)), m)
    assert f["rate"] == pytest.approx(0.1, abs=0.02) and f["interval"][0] < 0.1 < f["interval"][1]
    assert len(set(f["flagged"]["rows"]) & set(flipped.tolist())) >= 80
    assert f["suggestion"] == {"loss": "robust", "loss_params.label_smoothing": round(f["rate"], 3)}
    noise = estimate_flips(list(range(1000)), rng.normal(0.0, 1.0, 1000))
    assert not noise["identifiable"] and noise["suggestion"] is None


@pytest.fixture(scope="module")
def dpo_model(tmp_path_factory):
    """A tiny policy trained for a few DPO steps on the toy task (low words beat high words)."""
    from preftune.methods.dpo import train_dpo

    tmp = tmp_path_factory.mktemp("dpo")
    write_pairs(tmp / "train.jsonl", n=64, seed=1)
    run = train_dpo(base_config(tmp, max_steps=12, loss_params={"beta": 0.5}))
    return run.train.final_dir, tmp / "model"


def test_inspect_finds_planted_flips_with_a_dpo_model(tmp_path, dpo_model):
    model, reference = dpo_model
    rows = read_jsonl(write_pairs(tmp_path / "x.jsonl", n=80, seed=2))
    planted = set(range(3, 81, 10))
    for i in planted:
        rows[i - 1]["chosen"], rows[i - 1]["rejected"] = rows[i - 1]["rejected"], rows[i - 1]["chosen"]
    path = write_rows(tmp_path / "dirty.jsonl", rows)
    out = tmp_path / "inspect"
    assert inspect_main([str(path), "--model", str(model), "--reference", str(reference), "--beta", "0.5",
                         "--out", str(out), "--write-clean", str(tmp_path / "clean.jsonl"),
                         "--drop", "likely_flip"]) == 0
    f = json.loads((out / "inspect.json").read_text())["flips"]
    assert len(planted & set(f["flagged"]["rows"])) >= 7 and f["flagged"]["count"] <= 10
    assert 0.05 <= f["rate"] <= 0.2
    assert f["suggestion"]["loss_params.label_smoothing"] == pytest.approx(f["rate"], abs=1e-3)
    assert "label_smoothing" in (out / "report.md").read_text() and (out / "margins.png").exists()
    removed = [e["row"] for e in read_jsonl(tmp_path / "clean.removed.jsonl")]
    assert sorted(removed) == sorted(f["flagged"]["rows"])


def test_reward_model_margins_are_score_differences(tmp_path):
    import torch

    from preftune.doctor.scoring import PairScorer, model_kind
    from preftune.rewards.reward_model import load_reward_model, score

    save_tiny_model(tmp_path / "lm")
    torch.manual_seed(0)
    load_reward_model(str(tmp_path / "lm")).save_pretrained(tmp_path / "rm")
    tiny_tokenizer().save_pretrained(tmp_path / "rm")
    assert model_kind(str(tmp_path / "rm")) == "reward_model" and model_kind(str(tmp_path / "lm")) == "policy"
    pairs = load_preference_data(write_pairs(tmp_path / "p.jsonl", n=6)).pairs
    scorer = PairScorer.load(str(tmp_path / "rm"))
    kw = {"tokenizer": scorer.tokenizer}
    want = (np.array(score(scorer._policy, [p.prompt for p in pairs], [p.chosen for p in pairs], **kw))
            - np.array(score(scorer._policy, [p.prompt for p in pairs], [p.rejected for p in pairs], **kw)))
    # differences of fp32 scores of size ~1, maybe from other batches: ~1e-7 apart; 1e-6 + 1e-5 relative
    np.testing.assert_allclose(scorer.margins(pairs), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 0


def simulate_judgments(path: Path, reliability: list[float], n_pairs: int = 400, per_pair: int = 3,
                       seed: int = 0):
    """Each pair judged by `per_pair` random annotators, annotator j right with probability reliability[j]."""
    rng = random.Random(seed)
    truth, votes, rows = [], [], []
    for i in range(n_pairs):
        a_better = rng.random() < 0.5
        truth.append(a_better)
        a, b = f"answer a{i}", f"answer b{i}"
        said = []
        for j in rng.sample(range(len(reliability)), per_pair):
            says_a = a_better if rng.random() < reliability[j] else not a_better
            said.append(says_a)
            rows.append({"pair_id": i, "annotator": f"ann{j}", "prompt": f"question {i}",
                         "chosen": a if says_a else b, "rejected": b if says_a else a})
        votes.append(np.mean(said) > 0.5)
    rng.shuffle(rows)
    write_rows(path, rows)
    return np.array(truth), np.array(votes)


def test_aggregation_ranks_annotators_and_beats_majority_vote(tmp_path):
    reliability = [0.95, 0.85, 0.75, 0.6, 0.35]
    truth, majority = simulate_judgments(tmp_path / "judged.jsonl", reliability)
    out = tmp_path / "agg.jsonl"
    argv = [str(tmp_path / "judged.jsonl"), "--out", str(out), "--report", str(tmp_path / "a.json")]
    assert aggregate_main(argv) == 0
    table = json.loads((tmp_path / "a.json").read_text())["annotators"]
    assert [r["annotator"] for r in table] == [f"ann{j}" for j in range(5)]  # sorted by estimated reliability
    for r in table:
        assert r["reliability"] == pytest.approx(reliability[int(r["annotator"][3:])], abs=0.08)
    pairs = load_preference_data(out).pairs  # the standard format `preftune dpo` reads
    assert len(pairs) == 400 and all(0.5 <= p.preference <= 1 for p in pairs)
    by_question = {int(p.prompt.split()[1]): p.chosen.startswith("answer a") for p in pairs}
    aggregated = np.array([by_question[i] for i in range(400)])
    acc, acc_majority = (aggregated == truth).mean(), (majority == truth).mean()
    assert acc > acc_majority + 0.03, (acc, acc_majority)


def test_judgments_without_pair_id_are_grouped_by_text(tmp_path):
    rows = [{"annotator": "x", "prompt": "q", "chosen": "a", "rejected": "b"},
            {"annotator": "y", "prompt": "q", "chosen": "b", "rejected": "a"},
            {"annotator": "z", "prompt": "q ", "chosen": "b", "rejected": "a"},
            {"annotator": "x", "prompt": "r", "chosen": "c", "rejected": "d", "preference": 0.5}]
    out = tmp_path / "agg.jsonl"
    assert aggregate_main([str(write_rows(tmp_path / "j.jsonl", rows)), "--out", str(out)]) == 0
    agg = read_jsonl(out)
    assert len(agg) == 2 and agg[0]["judgments"] == 3
    assert agg[0]["chosen"] == "b" and agg[0]["preference"] > 0.5
    assert agg[1]["judgments"] == 0 and agg[1]["preference"] == 0.5  # a tie only: no evidence either way
    assert "annotator" not in agg[0]


def test_select_prefers_uncertain_pairs_and_diverse_prompts():
    margins = [5.0, 0.1, -0.2, 3.0, 0.05]
    prompts = ["a b c d", "same prompt here", "other words entirely", "x y z", "same prompt here"]
    assert select_pairs(prompts, margins, 2) == [(4, True), (2, True)]  # 1 repeats the prompt of 4
    assert select_pairs(prompts, margins, 5) == [(4, True), (2, True), (3, True), (0, True), (1, False)]


def test_select_cli_picks_the_pairs_the_model_is_unsure_of(tmp_path, dpo_model):
    model, reference = dpo_model
    confident = read_jsonl(write_pairs(tmp_path / "c.jsonl", n=20, seed=3))
    unsure = [{"prompt": f"w{40 + q} w{50 + q}", "chosen": f" w{k} w{k + 9} w{k + 3}",
               "rejected": f" w{k + 3} w{k + 9} w{k}"}
              for q in range(4) for k in (1, 5)]  # each prompt twice; the replies differ only in order
    pool = write_rows(tmp_path / "pool.jsonl", confident + unsure)
    out = tmp_path / "pick.jsonl"
    assert select_main([str(pool), "--budget", "4", "--model", str(model), "--reference", str(reference),
                        "--beta", "0.5", "--out", str(out)]) == 0
    picked = read_jsonl(out)
    assert len(picked) == 4 and all(r["pool_row"] > 20 for r in picked)  # only the unsure pairs
    assert len({r["prompt"] for r in picked}) == 4  # one per prompt
    assert all(r["score"]["diverse"] and "preference" not in r for r in picked)


def test_cli_errors_and_light_imports(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("preftune inspect: error: ")
    path = write_rows(tmp_path / "d.jsonl", dirty_rows())
    assert cli_main(["inspect", str(path), "--out", str(tmp_path / "o"), "--drop", "likely_flip"]) == 2
    assert "needs --model" in capsys.readouterr().err
    code = ("import sys; from preftune.doctor.cli import inspect_main; "
            f"inspect_main([{str(path)!r}, '--out', {str(tmp_path / 'o2')!r}, '--no-plots']); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
