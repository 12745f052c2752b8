"""Prompts with images in every command: the prompt reader, the judges (images and row columns as keyword
arguments), ``preftune iterate`` (samples, judged pairs that keep their images, DPO on them, the
held-out evaluation), ``preftune eval`` (win rates, KL) and ``preftune ppo`` (rollouts, a resume
mid-round), on the image lab's own prompt files and its tiny image-text model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import image_judges
from helpers import crash_at, save_tiny_model
from preftune.cli import main
from preftune.data.formats import read_prompts
from preftune.data.io import DataError
from preftune.data.rows import Prompt
from preftune.lab.shapes import judge as ground_truth
from preftune.lab.shapes import make_examples, write_dataset
from preftune.lab.vision_model import build_tiny_vlm
from preftune.model.load import load_tokenizer
from preftune.model.vision import load_image_inputs
from preftune.rewards.judges import call_pairwise, call_reward, load_reward, sentiment

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", seed=0)


@pytest.fixture(scope="module")
def lab_prompts(tmp_path_factory) -> tuple[Path, Path]:
    """The image lab's prompt files (rows: prompt messages with an image part, images, answer, kind)."""
    data = tmp_path_factory.mktemp("data")
    return (write_dataset(make_examples(8, 1), data, name="train_prompts", kind="prompts"),
            write_dataset(make_examples(6, 2), data, name="test_prompts", kind="prompts"))


def test_prompt_rows_keep_their_images_and_columns(vlm, lab_prompts, tmp_path):
    train, _ = lab_prompts
    prompts = read_prompts(train, load_tokenizer(str(vlm)))
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(prompts) == 8 and all(len(p.images) == 1 for p in prompts)
    assert prompts[0].images[0].path == str(train.parent / rows[0]["images"][0])
    assert "<image>" in prompts[0].text  # the image part rendered where the chat template puts it
    assert dict(prompts[0].columns) == {"answer": rows[0]["answer"], "kind": rows[0]["kind"]}
    # a text prompt with an image given as datasets writes it ({"bytes", "path"}), and a bad image: one line
    png = (train.parent / rows[0]["images"][0]).read_bytes()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Look:", "images": [{"bytes": None, "path": str(
        train.parent / rows[0]["images"][0])}]}) + "\n" + json.dumps({"prompt": "Look:", "images": [
            {"bytes": "not an image", "path": None}]}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl: row 2: field 'images\[0\]': "):
        read_prompts(path)
    first = read_prompts(path, skip_bad_rows=True)[0]
    assert first.images[0].encoded() == png


def test_judges_get_images_and_columns_as_keywords(vlm, lab_prompts):
    train, _ = lab_prompts
    prompts = read_prompts(train, load_tokenizer(str(vlm)))[:3]
    answers = [p.columns["answer"] for p in prompts]
    image_judges.CALLS.clear()
    rewards = call_reward(image_judges.looks, prompts, ["a", "bb", "ccc"])
    call = image_judges.CALLS[-1]
    assert call["images"] == [[p.images[0].path] for p in prompts] and call["kind"] == [
        p.columns["kind"] for p in prompts]
    assert len(rewards) == 3
    # the lab's ground truth reads the row's answer column
    assert call_reward(ground_truth, prompts, [answers[0], "nothing", answers[2].upper() + "!"]) == [1, 0, 1]
    assert call_pairwise(image_judges.longer, prompts, ["aa", "a", "b"], ["a", "aa", "c"]) == [1.0, 0.0, 0.5]
    # a judge that cannot see the images is refused; sentiment reads the completion alone
    with pytest.raises(ValueError, match="^judge: the prompts have images, but the judge takes no 'images'"):
        call_reward(image_judges.blind, prompts, ["a", "b", "c"])
    assert len(call_reward(load_reward("sentiment"), prompts, ["good", "bad", "ok"])) == 3
    assert call_reward(sentiment, ["x"], ["good"]) == sentiment(["x"], ["good"])  # text prompts: as before


def _iterate_args(vlm, train, test, out) -> list[str]:
    dpo = {"batch_size": 4, "epochs": 1, "learning_rate": 1e-3, "progress_bar": False, "save_steps": 0,
           "gradient_checkpointing": False}
    return ["iterate", "--model", str(vlm), "--train_file", str(train), "--eval_file", str(test),
            "--judge", "image_judges:looks", "--eval_reward", "preftune.lab.shapes:judge", "--rounds", "1",
            "--samples_per_prompt", "3", "--max_new_tokens", "4", "--eval_samples", "2", "--output_dir",
            str(out), "--dpo", json.dumps(dpo)]


def test_iterate_on_the_labs_image_prompts(vlm, lab_prompts, tmp_path, capsys):
    train, test = lab_prompts
    out = tmp_path / "iterate"
    image_judges.CALLS.clear()
    assert main(_iterate_args(vlm, train, test, out)) == 0
    said = capsys.readouterr()
    assert "done: 1 round, held-out reward " in said.out + said.err  # round 0 is the starting model
    rows = [json.loads(line) for line in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "round_1" / "samples.jsonl").read_text().splitlines()]
    assert rows and len(samples) == 8 and all(len(s["completions"]) == 3 for s in samples)
    # each pair keeps its prompt's image (an absolute path) and was judged with it
    sources = {json.loads(line)["images"][0] for line in train.read_text().splitlines()}
    assert {Path(r["images"][0]).relative_to(train.parent).as_posix() for r in rows} <= sources
    assert all(Path(r["images"][0]).is_absolute() for r in rows)
    assert sum(len(c["images"]) for c in image_judges.CALLS) == 24  # 8 prompts x 3 samples
    final = str(out / "round_1" / "final")
    assert load_image_inputs(final, load_tokenizer(final)) is not None  # an image-text model again
    summary = [json.loads(line) for line in (out / "iterate.jsonl").read_text().splitlines()]
    assert [r["round"] for r in summary] == [0, 1]
    assert summary[0]["eval/kl"] == 0.0 and 0.0 <= summary[1]["eval/reward"] <= 1.0
    assert summary[1]["eval/kl"] != 0.0  # the trained policy's samples score differently under pi_0


def test_eval_on_the_labs_image_prompts(vlm, lab_prompts, tmp_path, capsys):
    from preftune.methods.dpo import train_dpo

    train, test = lab_prompts
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    pairs.write_text("".join(json.dumps({**r, "images": [str(train.parent / r["images"][0])],
                                         "chosen": [{"role": "assistant", "content": r["answer"]}],
                                         "rejected": [{"role": "assistant", "content": "grey"}]}) + "\n"
                             for r in rows))
    train_dpo({"model": str(vlm), "train_file": str(pairs), "output_dir": str(tmp_path / "dpo"),
               "batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "progress_bar": False,
               "gradient_checkpointing": False, "save_steps": 0})
    out = tmp_path / "eval"
    code = main(["eval", "--baseline", str(vlm), "--models", str(tmp_path / "dpo" / "final"), "--prompts",
                 str(test), "--judge", "preftune.lab.shapes:judge", "--pairwise_judge", "image_judges:longer",
                 "--pairs", str(pairs), "--num_samples", "2", "--max_new_tokens", "4",
                 "--output_dir", str(out),
                 "--bootstrap", "50"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    base, model = result["models"]
    assert base["kl"] == 0.0 and model["kl"] is not None and model["kl"] != 0.0
    assert set(model["win_rates"]) == {"preftune.lab.shapes:judge", "image_judges:longer"}
    # the pairs' implicit-reward accuracy, scored with their images: DPO trained on these very pairs
    assert model["accuracy"]["accuracy"] > 0.5 and model["accuracy"]["num_pairs"] == 8
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(Path(s["images"][0]).is_file() for s in samples)


def test_a_text_model_with_image_prompts_is_one_line(lab_prompts, tmp_path, capsys):
    train, test = lab_prompts
    model = save_tiny_model(tmp_path / "text")
    code = main(["eval", "--baseline", str(model), "--models", str(model), "--prompts", str(test), "--judge",
                 "preftune.lab.shapes:judge",
                 "--output_dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"preftune eval: error: {test}: row 1: field 'images': the model is text-only")


def _ppo_config(vlm, train, tmp, **overrides) -> dict:
    return {"model": str(vlm), "train_file": str(train), "output_dir": str(tmp / "out"),
            "rollout_batch_size": 4, "num_rollouts": 2, "batch_size": 2, "ppo_epochs": 2,
            "learning_rate": 1e-3,
            "max_new_tokens": 4, "logging_steps": 1, "progress_bar": False, "gradient_checkpointing": False,
            "reward_fn": "image_judges:looks", **overrides}


def test_ppo_on_image_prompts_resumes_mid_round_to_the_same_weights(vlm, lab_prompts, tmp_path):
    from safetensors.torch import load_file

    from preftune.methods.ppo import train_ppo

    train, _ = lab_prompts
    whole = train_ppo(_ppo_config(vlm, train, tmp_path / "a"))
    rounds = [r for r in whole.train.history if "rollout/round" in r]
    assert {r["rollout/round"] for r in rounds} == {0.0, 1.0} and all(r["rollout/length"] > 0 for r in rounds)
    final = tmp_path / "a" / "out" / "final"
    assert load_image_inputs(str(final), load_tokenizer(str(final))) is not None
    assert (final / "value_head.safetensors").is_file()
    # interrupted after step 3 (round 1, whose rollout travels in the checkpoint with each sample's prompt
    # index: its images come back from the prompts), then resumed
    config = _ppo_config(vlm, train, tmp_path / "b", save_steps=3)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(config, callbacks=[crash_at(5)])
    train_ppo({**config, "resume": True})
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_equality_is_text_and_images():
    from preftune.data.images import ImageRef

    one, two = ImageRef("1" * 64, "/a.png"), ImageRef("2" * 64, "/b.png")
    assert Prompt("x", (one,), {"answer": "red"}) == Prompt("x", (one,), {"answer": "blue"})
    assert len({Prompt("x", (one,)), Prompt("x", (two,)), Prompt("x")}) == 3


@pytest.mark.parametrize("command", ["iterate", "eval", "ppo"])
def test_a_judge_that_cannot_see_the_images_is_refused_before_sampling(vlm, lab_prompts, tmp_path, capsys,
                                                                       command):
    train, test = lab_prompts
    out = tmp_path / "out"
    blind = "image_judges:blind"
    args = {"iterate": ["iterate", "--model", str(vlm), "--train_file", str(train), "--judge", blind],
            "eval": ["eval", "--baseline", str(vlm), "--models", str(vlm), "--prompts", str(test),
                     "--judge", blind],
            "ppo": ["ppo", "--model", str(vlm), "--train_file", str(train), "--reward_fn", blind]}
    assert main([*args[command], "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the prompts have images, but the judge takes no 'images' argument" in err
    assert not list(out.rglob("samples.jsonl")) and not (out / "final").exists()
