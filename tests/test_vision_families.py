"""Image-text families beyond LLaVA, built offline (``vlm_families.py``): LLaVA-NeXT (any-resolution
tiles, a token count per image that depends on its size), LLaVA-OneVision (the same for an image alone in
its row, its base tile in a row of several), Idefics3 (tiles and a global view between structure tokens),
Qwen2-VL, Qwen2.5-VL and Qwen3-VL (patch grids; 3-D rotary positions that preftune builds in every layout;
Qwen3-VL's deepstack features), Gemma 3 (image blocks that attend both ways). Per family: log-probs and
gradients equal the model's own forward on the padded batch in every layout (float64), for mixed image
sizes and a row with two images; the vision tower runs once per batch on each image's tiles or patches;
truncation never cuts an image's tokens; DPO trains with every reference mode and LoRA, SFT on the
answers."""

from __future__ import annotations

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
from preftune.data.images import image_size
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.model.load import load_model, load_tokenizer
from preftune.model.logps import SequenceScorer
from preftune.model.vision import BIDIRECTIONAL_IMAGES, VISION_TOWERS, check_family, load_image_inputs
from vlm_families import FAMILIES, built, noise_png

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = [(48, 32), (40, 64), (70, 20), (16, 16)]  # (width, height): different token counts per image


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return built(request.param, FAMILIES[request.param], tmp_path_factory)


def _png(tmp: Path, size: tuple[int, int], seed: int):
    return noise_png(tmp, size, seed).name


def _rows(tmp: Path, n: int) -> list[dict]:
    """``n`` pairs; row 0 holds two images (before and inside its text), the others one each."""
    answers = [("red", "blue"), ("green sharp", "yellow"), ("blue and more words here", "red"),
               ("two", "one")]
    rows = []
    for i in range(n):
        parts = [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
        images = [_png(tmp, SIZES[i % len(SIZES)], i)]
        if i == 0:
            parts = [*parts, {"type": "text", "text": " And here:"}, {"type": "image"}]
            images.append(_png(tmp, SIZES[-1], 99))
        rows.append({"prompt": [{"role": "user", "content": parts}], "images": images,
                     "chosen": [{"role": "assistant", "content": answers[i % 4][0]}],
                     "rejected": [{"role": "assistant", "content": answers[i % 4][1]}]})
    return rows


def _tokenized(tmp: Path, family, rows, budgets: Budgets | None = None):
    _, _, tokenizer, images = family
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_preference_data([str(tmp / "pairs.jsonl")], kind="paired", tokenizer=tokenizer)
    return PairTokenizer(tokenizer, budgets or Budgets(), images).tokenize(loaded.pairs)


def test_image_token_counts_follow_the_image_size(family):
    name, _, _, images = family
    counts = [images.expansion(size).count(images.feature_token_id) for size in SIZES]
    if name == "llava_next":  # base tile + the unpadded grid + a newline per grid row: 14 for 48x32
        assert counts[0] == 14 and len(set(counts)) > 1
    elif name == "llava_onevision":  # as LLaVA-NeXT alone; in a row of several, the base tile + a newline
        shared = [images.expansion(size, alone=False).count(images.feature_token_id) for size in SIZES]
        assert counts[0] == 14 and len(set(counts)) > 1 and shared == [5] * len(SIZES)
    elif name == "idefics3":  # (tiles + global view) x 4 tokens, between structure tokens
        assert all(c % 4 == 0 for c in counts) and images.structure_ids
    elif name == "gemma3":  # a fixed 4 soft tokens, between <start_of_image> and <end_of_image>
        assert counts == [4] * len(SIZES) and images.image_token_id != images.feature_token_id
    else:  # Qwen: one token per 16x16 px once resized to multiples of 16 (48x32 -> 3 x 2), a grid each
        assert counts[0] == 6 and [images.grid(size) for size in SIZES[:2]] == [(1, 2, 3), (1, 4, 2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logps_and_gradients_equal_the_models_own_forward(tmp_path, family, layout):
    name, directory, tokenizer, images = family
    data = _tokenized(tmp_path, family, _rows(tmp_path, 3))
    assert len(data.pairs) == 3 and len(data.pairs[0].images) == 2
    model = load_model(str(directory)).double()
    padded = collate(data.pairs, layout="padded", pad_id=tokenizer.pad_token_id, images=images)
    # rows: the chosen sequences, then the rejected ones; each row's images, in its order
    refs = [r for _ in range(2) for p in data.pairs for r in p.images]
    rows = [len(p.images) for _ in range(2) for p in data.pairs]  # LLaVA-OneVision tiles a lone image only
    pixels = {k: v.double() if v.is_floating_point() else v
              for k, v in images.pixel_inputs(refs, rows).items()}
    # the processor marks image tokens: Qwen's model builds its mrope positions from the marks, Gemma 3's
    # its bidirectional image blocks
    marks = padded.input_ids.eq(images.feature_token_id).long()
    if images.grid is not None:
        pixels["mm_token_type_ids"] = marks
    if name == "gemma3":
        pixels["token_type_ids"] = marks
    weights = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, expected_grads = logps_and_grads(
        model, lambda: image_model_logps(model, padded, pixels), weights)

    batch = collate(data.pairs, layout=layout, pad_id=tokenizer.pad_token_id, images=images)
    scorer = SequenceScorer(model)
    # packed and prefix-shared batches run unpadded (model/attention.py), images and mrope included; Gemma 3's
    # image blocks need the dense masks
    unpadded = layout != "padded" and name not in BIDIRECTIONAL_IMAGES
    assert (scorer._unpadded(batch, model.get_decoder()) is not None) == unpadded
    got, grads = logps_and_grads(model, lambda: chosen_then_rejected(scorer(batch)), weights)
    # as tests/test_vision.py: a float64 model, the head's fp32 logits: a few eps of each sum
    assert_logps_close(got, expected, rtol=8 * FP32_EPS)
    assert set(grads) == set(expected_grads)
    assert_grads_close(grads, expected_grads)
    tower = [k for k in expected_grads if any(t in k.split(".") for t in VISION_TOWERS)]
    assert tower and any(expected_grads[k].abs().sum() > 0 for k in tower)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_vision_tower_runs_once_on_each_images_tiles(tmp_path, family, layout):
    name, directory, tokenizer, images = family
    data = _tokenized(tmp_path, family, _rows(tmp_path, 3))
    model = load_model(str(directory))
    tower = next(m for n, m in model.model.named_children() if n in VISION_TOWERS)
    seen = []  # the batch size of each call: tiles (LLaVA-NeXT, Idefics3) or patches (Qwen)

    def first_tensor(module, args, kwargs):
        seen.append(next(v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)).shape[0])

    tower.register_forward_pre_hook(first_tensor, with_kwargs=True)
    batch = collate(data.pairs, layout=layout, pad_id=tokenizer.pad_token_id, images=images)
    with torch.no_grad():
        SequenceScorer(model)(batch)
    pixels = images.pixel_inputs([r for p in data.pairs for r in p.images],
                                 [len(p.images) for p in data.pairs])["pixel_values"]
    # Qwen: every image's patches, one after the other; [images, tiles, C, H, W] (padding tiles are 0);
    # Gemma 3: [images, C, H, W]
    real_tiles = int((pixels.flatten(2).abs().sum(-1) > 0).sum()) if pixels.dim() == 5 else pixels.shape[0]
    units = pixels.shape[0] if images.grid is not None else real_tiles
    assert seen == [units]  # 4 images, once each, though 6 sequences read them
    sequences = 3 if layout == "prefix_shared" else 6
    per_sequence = sum(len(p.image_positions) for p in data.pairs)
    assert batch.image_index.numel() == per_sequence * (sequences // 3)
    assert batch.input_ids.reshape(-1)[batch.image_index].eq(images.feature_token_id).all()


def test_truncation_never_cuts_an_images_tokens(tmp_path, family):
    name, _, tokenizer, images = family
    long_text = " ".join(["Once upon a time there was a little dog."] * 4)
    row = {"prompt": [{"role": "user", "content": [{"type": "text", "text": long_text}, {"type": "image"},
                                                   {"type": "text", "text": " What is it?"}]}],
           "images": [_png(tmp_path, SIZES[0], 0)],
           "chosen": [{"role": "assistant", "content": "red"}],
           "rejected": [{"role": "assistant", "content": "blue"}]}
    full = _tokenized(tmp_path, family, [row], Budgets(None, None, None)).pairs[0]
    expansion = images.expansion(image_size(full.images[0]))
    width = len(expansion)
    start = next(i for i in range(len(full.prompt_ids)) if tuple(full.prompt_ids[i:i + width]) == expansion)
    tail = len(full.prompt_ids) - start  # the image's expansion and the text after it
    kept = _tokenized(tmp_path, family, [row], Budgets(512, tail + 3, None)).pairs[0]
    assert kept.prompt_ids[-tail:] == full.prompt_ids[-tail:]  # only text before the image was cut
    # a budget one short of the image's first image or structure token (Gemma 3's expansion starts with
    # text, newlines): the pair is dropped
    marked = images.structure_ids | {images.feature_token_id}
    first = next(i for i, t in enumerate(expansion) if t in marked)
    dropped = _tokenized(tmp_path, family, [row], Budgets(512, tail - first - 1 + 1, None))
    assert dropped.dropped_images == 1 and not dropped.pairs


@pytest.mark.parametrize("setting", [{"reference": "model"}, {"reference": "precomputed"},
                                     {"lora": True, "reference": "adapter", "lora_projector": True},
                                     {"loss": "ipo"}], ids=["model", "precomputed", "lora-adapter", "ipo"])
def test_dpo_trains_each_family(tmp_path, family, setting):
    from preftune.methods.dpo import train_dpo

    name, directory, _, _ = family
    rows = _rows(tmp_path, 4)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(directory), "train_file": str(tmp_path / "pairs.jsonl"),
              "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 3, "learning_rate": 1e-2,
              "logging_steps": 1, "progress_bar": False, **setting}
    if setting.get("reference") == "precomputed":
        config["reference_cache_dir"] = str(tmp_path / "cache")
    if name == "gemma3" and setting.get("lora_projector"):  # its projector is a bare weight, no linear layer
        with pytest.raises(ValueError, match="lora_projector: the gemma3 projector has no linear layers"):
            train_dpo(config)
        config = {**config, "lora_projector": False, "overwrite": True}
    run = train_dpo(config)
    losses = [r["loss"] for r in run.train.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    saved = Path(config["output_dir"]) / "final"
    assert load_image_inputs(str(saved), load_tokenizer(str(saved))) is not None
    if setting.get("lora"):  # adapters on the language model and the projector, never the vision tower
        from safetensors.torch import load_file

        names = list(load_file(str(saved / "adapter" / "adapter_model.safetensors")))
        tower = [n for n in names if any(t in n.split(".") for t in VISION_TOWERS) and "merger" not in n]
        assert names and not tower
        projector = {"idefics3": "connector", "llava_next": "multi_modal_projector",
                     "llava_onevision": "multi_modal_projector"}.get(name, "merger")
        assert name == "gemma3" or any(projector in n for n in names)
        assert any(".layers." in n for n in names)


def test_sft_trains_each_family_on_the_answers(tmp_path, family):
    from preftune.methods.sft import train_sft

    name, directory, _, _ = family
    rows = [{"messages": [*r["prompt"], *r["chosen"]], "images": r["images"]} for r in _rows(tmp_path, 4)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train_sft({"model": str(directory), "train_file": str(tmp_path / "sft.jsonl"),
                     "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 4,
                     "learning_rate": 3e-3, "logging_steps": 1, "progress_bar": False})
    losses = [r["loss"] for r in run.train.history]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


@pytest.mark.parametrize(("model_type", "reason"), [
    ("qwen3_vl_moe", "mixture-of-experts"), ("paligemma", "both ways"), ("mllama", "cross-attention"),
    ("some_new_vlm", "not supported yet")])
def test_other_families_are_one_line_saying_why(model_type, reason):
    config = type("Config", (), {"model_type": model_type})()
    with pytest.raises(ValueError, match=rf"^config: model: a {model_type} image-text model: .*{reason}"):
        check_family(config)


def test_a_onevision_directory_without_its_tile_size_is_one_line(tmp_path):
    from vlm_families import build_llava_onevision

    directory = build_llava_onevision(tmp_path / "model")
    settings = json.loads((directory / "processor_config.json").read_text())
    del settings["num_image_tokens"]
    (directory / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"needs num_image_tokens in its processor_config.json"):
        load_image_inputs(str(directory), load_tokenizer(str(directory)))
