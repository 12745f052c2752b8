"""Image-text DPO: image-token accounting, exact log-probs and gradients, data errors, training, the lab."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from helpers import (
    FP32_EPS,
    assert_grads_close,
    assert_logps_close,
    chosen_then_rejected,
    image_model_logps,
    logps_and_grads,
)
from preftune.data.batching import LAYOUTS, collate
from preftune.data.formats import load_preference_data
from preftune.data.io import DataError
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.lab.shapes import ShapeScene, make_examples, png_bytes, write_dataset
from preftune.lab.vision_model import build_tiny_vlm
from preftune.model.load import load_model, load_tokenizer
from preftune.model.logps import SequenceScorer
from preftune.model.vision import load_image_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
USER = [{"role": "user",
         "content": [{"type": "image"}, {"type": "text", "text": "What colour are the shapes?"}]}]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", seed=0)


@pytest.fixture(scope="module")
def inputs(vlm):
    tokenizer = load_tokenizer(str(vlm))
    return tokenizer, load_image_inputs(str(vlm), tokenizer)


def _image(tmp_path: Path, seed: int = 0, colour: str = "red") -> str:
    name = f"img{seed}-{colour}.png"
    (tmp_path / name).write_bytes(png_bytes(ShapeScene(colour, "circle", 1 + seed % 3, seed)))
    return name


def _pair_rows(tmp_path: Path, n: int = 4) -> list[dict]:
    answers = [("red", "blue"), ("green sharp", "yellow"), ("blue and more words here", "red"),
               ("two", "three one")]
    return [{"prompt": USER, "images": [_image(tmp_path, i)],
             "chosen": [{"role": "assistant", "content": answers[i % 4][0]}],
             "rejected": [{"role": "assistant", "content": answers[i % 4][1]}]} for i in range(n)]


def _write(tmp_path: Path, rows: list[dict], name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenized(tmp_path, inputs, rows, budgets: Budgets | None = None):
    tokenizer, images = inputs
    budgets = budgets or Budgets()
    loaded = load_preference_data([str(_write(tmp_path, rows))], kind="paired", tokenizer=tokenizer)
    return PairTokenizer(tokenizer, budgets, images).tokenize(loaded.pairs)


def _per_image(images) -> int:
    """Image tokens of one image of the tiny LLaVA (a fixed count: 16, whatever the size)."""
    return images.expansion((32, 32)).count(images.feature_token_id)


@pytest.mark.parametrize("n", [1, 4], ids=["one pair", "mixed lengths"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_logps_and_gradients_equal_the_models_own_forward(tmp_path, vlm, inputs, layout, n):
    tokenizer, images = inputs
    data = _tokenized(tmp_path, inputs, _pair_rows(tmp_path, n))
    # float64 weights: the comparison is then exact to far below 1e-5 (the chunked head keeps fp32 logits),
    # where fp32 would resolve summed log-probs of ~60 nats and gradients of ~60 only to ~1e-5
    model = load_model(str(vlm)).double()
    padded = collate(data.pairs, layout="padded", pad_id=tokenizer.pad_token_id, images=images)
    pixels = torch.cat([images.pixel_values(p.images) for p in data.pairs] * 2).double()  # one image per row
    weights = torch.randn(2 * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, expected_grads = logps_and_grads(
        model, lambda: image_model_logps(model, padded, {"pixel_values": pixels}), weights)

    batch = collate(data.pairs, layout=layout, pad_id=tokenizer.pad_token_id, images=images)
    scorer = SequenceScorer(model)
    # packed and prefix-shared batches run unpadded (model/attention.py), images included
    assert (scorer._unpadded(batch, model.get_decoder()) is not None) == (layout != "padded")
    got, grads = logps_and_grads(model, lambda: chosen_then_rejected(scorer(batch)), weights)
    # the float64 decoder leaves only the head's fp32 rounding: each token's log-prob within a few eps
    # of its logits' size (~ its own size), so the sums within a few eps of theirs: 8 eps (1e-6)
    assert_logps_close(got, expected, rtol=8 * FP32_EPS)
    assert set(grads) == set(expected_grads)
    # to helpers.GRAD_RTOL of each gradient's scale (some reach ~6000 here, the key biases' are 0 up to
    # rounding): they flow back from the head's fp32 dlogits, ~1 eps of each, summed with both signs
    assert_grads_close(grads, expected_grads)
    assert any("vision_tower" in k and expected_grads[k].abs().sum() > 0 for k in expected_grads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_image_is_encoded_once_per_pair(tmp_path, vlm, inputs, layout):
    tokenizer, images = inputs
    data = _tokenized(tmp_path, inputs, _pair_rows(tmp_path, 4))
    model = load_model(str(vlm))
    encoded = []
    model.model.vision_tower.register_forward_hook(
        lambda m, args, kwargs_out: encoded.append(args[0].shape[0]))
    batch = collate(data.pairs, layout=layout, pad_id=tokenizer.pad_token_id, images=images)
    with torch.no_grad():
        SequenceScorer(model)(batch)
    assert encoded == [4]  # one vision pass over the 4 pairs' 4 images, though 8 sequences read them
    # every image token of every sequence takes a feature row, and each pair's rows are its own image's
    per_pair = _per_image(images)
    sequences = 4 if layout == "prefix_shared" else 8
    assert batch.image_index.numel() == sequences * per_pair
    assert batch.input_ids.reshape(-1)[batch.image_index].eq(images.image_token_id).all()
    assert sorted(set(batch.image_feature.tolist())) == list(range(4 * per_pair))


def test_truncation_never_cuts_image_tokens(tmp_path, inputs):
    tokenizer, images = inputs
    long_text = " ".join(["Once upon a time there was a little dog."] * 6)
    turns = [{"role": "user", "content": long_text}, {"role": "assistant", "content": "Yes."},
             {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                          {"type": "text", "text": " What colour are the shapes in this "
                                           "picture? Tell me in one word, please, and only the colour."}]}]
    row = {"prompt": turns, "images": [_image(tmp_path)],
           "chosen": [{"role": "assistant", "content": "red"}],
           "rejected": [{"role": "assistant", "content": "blue"}]}
    full = _tokenized(tmp_path, inputs, [row], Budgets(None, None, None)).pairs[0]
    assert full.prompt_ids.count(images.image_token_id) == _per_image(images)
    # a budget that holds the whole image turn: the two text turns before it go, whole
    last_turn = dict(row, prompt=turns[2:])
    whole = len(_tokenized(tmp_path, inputs, [last_turn], Budgets(None, None, None)).pairs[0].prompt_ids)
    kept = _tokenized(tmp_path, inputs, [row], Budgets(512, whole + 2, None)).pairs[0]
    assert (kept.prompt_ids[0] == tokenizer.bos_token_id
            and kept.prompt_ids[1:] == full.prompt_ids[-len(kept.prompt_ids) + 1:])
    # the cut is at the turn's start
    assert tokenizer.decode(kept.prompt_ids[1:6]).startswith("Q: Look")
    # tighter than the image turn: text tokens before the image go, never the image's
    tail = len(full.prompt_ids) - full.image_positions[0]  # the image and the text after it
    cut = _tokenized(tmp_path, inputs, [row], Budgets(512, tail + 3, None))
    pair = cut.pairs[0]
    assert cut.truncated == 1 and len(pair.prompt_ids) == tail + 3
    assert pair.prompt_ids[-tail:] == full.prompt_ids[-tail:]  # only text before the image was cut
    assert pair.prompt_ids.count(images.image_token_id) == _per_image(images)
    assert ([pair.prompt_ids[i] for i in pair.image_positions]
            == [images.image_token_id] * _per_image(images))
    short = _pair_rows(tmp_path, 1)[0]
    fits = len(_tokenized(tmp_path, inputs, [short], Budgets(None, None, None)).pairs[0].prompt_ids)
    assert fits < tail
    dropped = _tokenized(tmp_path, inputs, [row, short], Budgets(512, fits, None))
    assert dropped.dropped_images == 1 and len(dropped.pairs) == 1
    assert ("pairs.jsonl: row 1: the prompt's image tokens do not fit max_prompt_length"
            in dropped.first_dropped)


def test_text_prompts_get_their_images_first_and_images_may_be_inline(tmp_path, inputs):
    tokenizer, images = inputs
    png = png_bytes(ShapeScene("blue", "square", 2, 3))
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    rows = [{"prompt": "Q: What colour?\nA:", "chosen": " red", "rejected": " blue",
             "images": [_image(tmp_path)]},
            {"prompt": "Q: What colour?\nA:", "chosen": " blue", "rejected": " red", "images": [data_uri]}]
    data = _tokenized(tmp_path, inputs, rows)
    for pair in data.pairs:
        assert pair.prompt_ids[0] == tokenizer.bos_token_id
        assert pair.image_positions == tuple(range(1, 1 + _per_image(images)))
    assert data.pairs[0].images[0].path and data.pairs[1].images[0].data  # a file, and inline bytes


def test_parquet_image_structs(tmp_path, inputs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    blob = png_bytes(ShapeScene("green", "triangle", 1, 5))
    table = pa.table({"prompt": ["Q: What colour?\nA:"], "chosen": [" green"], "rejected": [" red"],
                      "images": [[{"bytes": blob, "path": None}]]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    loaded = load_preference_data([str(tmp_path / "pairs.parquet")], kind="paired", tokenizer=inputs[0])
    assert loaded.pairs[0].images[0].data == blob


def test_datasets_image_columns_saved_or_as_a_hub_repository(tmp_path, inputs):
    """A column with datasets' Image feature (which datasets decodes to PIL images) is read undecoded: the
    image's own bytes, from a save_to_disk directory and from a hub-layout repository of parquet shards."""
    import datasets

    blobs = [png_bytes(ShapeScene(c, "circle", 1, i)) for i, c in enumerate(["red", "blue"])]
    text = datasets.Value("string")
    features = datasets.Features({"prompt": text, "chosen": text, "rejected": text,
                                  "images": datasets.List(datasets.Image())})
    columns = {"prompt": ["Q: What colour?\nA:"] * 2, "chosen": [" red", " blue"],
               "rejected": [" blue", " red"], "images": [[{"bytes": b, "path": None}] for b in blobs]}
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    for where in ("saved", "repo"):
        loaded = load_preference_data([str(tmp_path / where)], kind="paired", tokenizer=inputs[0])
        assert [p.images[0].data for p in loaded.pairs] == blobs, where


@pytest.mark.parametrize("change, message", [
    (lambda r, d: r.update(images=["missing.png"]), "row 2: field 'images[0]': no such image file"),
    (lambda r, d: r.update(images=[_corrupt(d)]), "row 2: field 'images[0]': corrupt image"),
    (lambda r, d: r.update(images=["data:image/png;base64,@@@"]), "row 2: field 'images[0]': invalid base64"),
    (lambda r, d: r.update(images=[]),
     "row 2: field 'images': missing: the messages hold 1 image placeholder"),
    (lambda r, d: r.update(images=[r["images"][0]] * 2),
     "row 2: field 'images': 2 image(s) but 1 {'type': 'image'}"),
    (lambda r, d: r.update(chosen=USER),
     "row 2: field 'chosen': holds an image; images belong to the prompt"),
])
def test_bad_images_are_one_line_errors(tmp_path, inputs, change, message):
    rows = _pair_rows(tmp_path, 3)
    change(rows[1], tmp_path)
    with pytest.raises(DataError) as e:
        load_preference_data([str(_write(tmp_path, rows))], kind="paired", tokenizer=inputs[0])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "pairs.jsonl"))


def _corrupt(directory: Path) -> str:
    (directory / "bad.png").write_bytes(png_bytes(ShapeScene("red", "circle", 1, 0))[:60])
    return "bad.png"


def test_bad_image_rows_can_be_skipped(tmp_path, inputs):
    rows = _pair_rows(tmp_path, 3)
    rows[2]["images"] = ["missing.png"]
    loaded = load_preference_data([str(_write(tmp_path, rows))], kind="paired", tokenizer=inputs[0],
                                  skip_bad_rows=True)
    assert len(loaded.pairs) == 2 and "images[0]" in loaded.skipped[0]


def test_a_text_model_refuses_image_rows(tmp_path, inputs):
    from preftune.methods.dpo import train_dpo

    with pytest.raises(ValueError, match=r"pairs.jsonl: row 1: field 'images': this run takes no images "
                                         r"\(its model is text-only"):
        train_dpo({"train_file": str(_write(tmp_path, _pair_rows(tmp_path, 2))),
                   "output_dir": str(tmp_path / "run"), "chat_template": inputs[0].chat_template})


@pytest.mark.parametrize("setting", [
    {"reference": "precomputed"},
    {"reference": "model", "layout": "padded"},
    {"lora": True, "reference": "adapter", "learning_rate": 3e-2, "lora_projector": True},
    {"loss": "kto", "kto": True},
    {"loss": "ipo", "layout": "packed"},
    {"loss": "simpo", "gradient_checkpointing": "selective"},
], ids=["precomputed", "model-padded", "lora-adapter", "kto", "ipo-packed", "simpo-selective"])
def test_dpo_with_images_lowers_the_loss(tmp_path, vlm, setting):
    from preftune.methods.dpo import train_dpo

    setting = dict(setting)
    rows = _pair_rows(tmp_path, 8)
    if setting.pop("kto", False):  # unpaired rows: each pair's answers as a desirable and an undesirable one
        rows = [{"prompt": r["prompt"], "images": r["images"], "completion": r[k], "label": k == "chosen"}
                for r in rows for k in ("chosen", "rejected")]
    config = {"model": str(vlm), "train_file": str(_write(tmp_path, rows)),
              "output_dir": str(tmp_path / "run"), "batch_size": 4, "epochs": 6, "learning_rate": 3e-3,
              "logging_steps": 1, "save_steps": 0, **setting}
    if setting.get("reference") == "precomputed":
        config["reference_cache_dir"] = str(tmp_path / "cache")
    run = train_dpo(config)
    losses = [r["loss"] for r in run.train.history if "loss" in r]
    assert losses[-1] < losses[0] - 0.01, losses
    saved = Path(config["output_dir"]) / "final"
    # a loadable image-text model
    assert load_image_inputs(str(saved), load_tokenizer(str(saved))) is not None
    if setting.get("lora"):
        from peft import PeftModel

        adapters = PeftModel.from_pretrained(load_model(str(vlm)), saved / "adapter")
        names = [n for n, _ in adapters.named_parameters() if "lora_" in n]
        assert names and not any("vision_tower" in n for n in names)
        assert any("multi_modal_projector" in n for n in names) and any("language_model" in n for n in names)


def test_sft_with_images_trains_on_the_answers(tmp_path, vlm):
    from preftune.methods.sft import train_sft

    examples = make_examples(12, seed=0)
    path = write_dataset(examples, tmp_path / "data", name="sft", kind="sft")
    run = train_sft({"model": str(vlm), "train_file": str(path), "output_dir": str(tmp_path / "run"),
                     "batch_size": 4, "epochs": 4, "learning_rate": 3e-3, "logging_steps": 1,
                     "save_steps": 0})
    losses = [r["loss"] for r in run.train.history if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses


def test_vision_lab_on_a_tiny_setting(tmp_path):
    from preftune.lab.vision import VisionLabOptions, run_vision_lab

    options = VisionLabOptions(output_dir=str(tmp_path / "lab"), sft_examples=240, sft_epochs=2,
                               dpo_prompts=120, test_prompts=24, eval_samples=2, dpo_epochs=1, batch_size=16)
    result = run_vision_lab(options, log=lambda *_: None)
    assert result.pairs + result.both_right + result.both_wrong == 120 and result.pairs > 0
    assert set(result.policies) == {"sft", "dpo", "dpo+nll", "online"}
    # the online arm: two rounds, each trained from the last on pairs of its own answers
    assert all((tmp_path / "lab" / "online" / f"round_{r}" / "final").is_dir() for r in (1, 2))
    assert (tmp_path / "lab" / "data" / "online_pairs_2.jsonl").stat().st_size > 0
    for name, score in result.policies.items():
        assert 0 <= score.accuracy <= 1 and 0 <= score.win_rate <= 1
        assert set(score.by_kind) == {"colour", "shape", "count"}
        assert (name == "sft") == (score.kl == 0.0)  # each arm moved away from SFT; KL from its own samples
    report = (tmp_path / "lab" / "report.md").read_text()
    assert "greedy accuracy" in report and f"{result.policies['dpo'].win_rate:.3f}" in report
    assert json.loads((tmp_path / "lab" / "results.json").read_text())["pairs"] == result.pairs


def test_the_doctor_tells_prompts_apart_by_their_images(tmp_path):
    from preftune.doctor.checkup import inspect_data

    rows = _pair_rows(tmp_path, 2)
    rows[1]["chosen"], rows[1]["rejected"] = rows[0]["chosen"], rows[0]["rejected"]  # same text, other image
    rows.append(dict(rows[0]))  # same text, same image: a real duplicate
    text = inspect_data(_write(tmp_path, rows)).summary["text"]
    assert text["exact_duplicates"]["pairs"]["rows"] == [3]


def test_budgets_are_capped_to_the_language_models_positions(vlm):
    from preftune.engine.setup import fit_max_length
    from preftune.methods.dpo import DPOConfig

    config = DPOConfig(model=str(vlm), train_file="-")
    fit_max_length(config)  # LlavaConfig keeps max_position_embeddings in its text config
    assert (config.max_length, config.max_prompt_length) == (512, 256)


@pytest.mark.parametrize("argv, message", [
    (["--patch_size", "5"], "--patch_size must divide the 32-pixel images, got 5"),
    (["--dpo_prompts", "0"], "--dpo_prompts must be >= 1, got 0"),
    (["--nll_weight", "0"], "--nll_weight must be > 0, got 0.0"),
])
def test_vision_lab_options_are_checked_in_one_line(argv, message, capsys):
    from preftune.cli import main

    assert main(["lab", "vision", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_an_interrupted_image_run_resumes_to_the_same_weights(tmp_path, vlm):
    """Checkpoints of image-text models hold transformers' serialized key names; resume maps them back."""
    from safetensors.torch import load_file

    from preftune.methods.dpo import train_dpo

    train = str(_write(tmp_path, _pair_rows(tmp_path, 8)))
    settings = {"model": str(vlm), "train_file": train, "batch_size": 2, "max_steps": 4, "save_steps": 2,
                "learning_rate": 1e-3, "reference": "model", "logging_steps": 1}
    train_dpo({**settings, "output_dir": str(tmp_path / "whole")})

    def crash(step, _metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dpo({**settings, "output_dir": str(tmp_path / "cut")}, callbacks=[crash])
    resumed = train_dpo({**settings, "output_dir": str(tmp_path / "cut"), "resume": True})
    assert [r["step"] for r in resumed.train.history] == [3, 4]
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert whole.keys() == cut.keys()
    for key in whole:  # bitwise: the same process, thread count, kernels and batches, resumed or not
        torch.testing.assert_close(cut[key], whole[key], atol=0, rtol=0, msg=key)


def test_inspect_reports_images_and_tokenizes_image_rows(tmp_path, vlm, inputs):
    """``preftune inspect`` with an image-text model: image rows tokenize (they are not bad rows), and the
    images section counts images per row, repeats across rows, sizes, unreadable images, the tokens each
    image fills and the pairs whose images do not fit max_prompt_length."""
    from preftune.doctor.checkup import InspectOptions, inspect_data
    from preftune.doctor.report import write_report

    rows = _pair_rows(tmp_path, 4)
    rows[1]["images"] = rows[0]["images"]  # the same image again
    rows[2]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "Two?"}]}]
    rows[2]["images"] = [_image(tmp_path, 5), _image(tmp_path, 6)]
    rows[3]["images"] = ["missing.png"]
    path = _write(tmp_path, rows, name="inspected.jsonl")
    per_image = _per_image(inputs[1])
    # the tokens from a prompt's first image to its end: the one-image prompts' fit the budget (with BOS),
    # the two-image prompt's do not
    pairs = _tokenized(tmp_path, inputs, rows[:3], Budgets(None, None, None)).pairs
    tails = [len(p.prompt_ids) - p.image_positions[0] for p in pairs]
    budget = max(tails[:2]) + 1
    assert tails[2] + 1 > budget
    result = inspect_data(path, InspectOptions(tokenizer=str(vlm), budgets=Budgets(512, budget, None)))
    assert result.summary["tokens"]["errors"]["count"] == 0 and result.summary["tokens"]["pairs"] == 3
    images = result.summary["images"]
    assert (images["images"], images["rows_with_images"], images["unique_images"]) == (4, 3, 3)
    assert images["repeated_images"] == {"rows": [2], "of": [1]}
    assert images["width"]["max"] == 32 and images["unreadable"]["rows"] == [4]
    assert images["tokens_per_image"]["max"] == per_image and images["too_long"] == {"rows": [3]}
    text = write_report(result, tmp_path / "report").read_text()
    assert "## Images" in text and "4 images in 3 rows (3 distinct; at most 2 in a row)" in text


def test_vision_lab_over_seeds_reports_mean_sd_and_judges_differences_by_the_spread(tmp_path):
    from preftune.lab.vision import VisionLabOptions
    from preftune.lab.vision_seeds import run_seeds, verdict

    assert verdict([0.02, 0.03, 0.025]) == "gain" and verdict([-0.05, -0.04, -0.06]) == "loss"
    assert verdict([0.05, -0.01, 0.02]) == "within the spread"  # the seeds disagree in sign
    assert verdict([0.01, 0.2, 0.01]) == "within the spread"  # |mean| 0.073 < sd 0.11
    options = VisionLabOptions(output_dir=str(tmp_path / "lab"), sft_examples=160, sft_epochs=2,
                               dpo_prompts=80, test_prompts=16, eval_samples=2, dpo_epochs=1, batch_size=16,
                               seeds=2, seed=5)
    results = run_seeds(options, log=lambda *_: None)
    assert [r.policies["sft"].kl for r in results] == [0.0, 0.0] and len(results) == 2
    assert (tmp_path / "lab" / "seed_5" / "results.json").exists()
    assert (tmp_path / "lab" / "seed_6" / "results.json").exists()
    saved = json.loads((tmp_path / "lab" / "results.json").read_text())
    assert [s["policies"]["dpo"]["accuracy"] for s in saved["seeds"]] == [r.policies["dpo"].accuracy
                                                                          for r in results]
    report = (tmp_path / "lab" / "report.md").read_text()
    accuracies = [r.policies["sft"].accuracy for r in results]
    mean, sd = sum(accuracies) / 2, abs(accuracies[0] - accuracies[1]) / 2 ** 0.5
    assert f"| greedy accuracy | {mean:.3f} ± {sd:.3f} |" in report
    assert "- dpo, greedy accuracy: d = " in report
