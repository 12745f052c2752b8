"""Sampling from prompts with images (model/image_sampling.py), per family: each drawn token's log-prob is
the model's own (the sampler's KV-cache decode equals the trainer's scoring of the finished sequence), the
vision tower runs once per batch whatever the samples per prompt, seeds reproduce, and ``generate`` agrees
on greedy answers where it can run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import FP32_EPS, assert_logps_close
from preftune.data.batching import collate
from preftune.data.images import parse_images
from preftune.data.rows import Prompt
from preftune.data.tokenize import Budgets, PairTokenizer, TokenizedPair
from preftune.lab.vision_model import build_tiny_vlm
from preftune.model.generation import sample_continuations, sequence_logps
from preftune.model.image_sampling import sample_with_images
from preftune.model.load import load_model, load_tokenizer
from preftune.model.logps import SequenceScorer
from preftune.model.vision import VISION_TOWERS, load_image_inputs
from vlm_families import FAMILIES, built, noise_png

pytestmark = pytest.mark.usefixtures("one_thread")
BUILDERS = {**FAMILIES, "llava": lambda d: build_tiny_vlm(d, seed=0)}
SIZES = [(48, 32), (40, 64), (16, 16)]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    return built(request.param, BUILDERS[request.param], tmp_path_factory)


def _png(tmp: Path, size: tuple[int, int], seed: int):
    return noise_png(tmp, size, seed)


def _prompts(tmp: Path, tokenizer) -> list[Prompt]:
    """Three prompts of different lengths and image sizes; the second holds two images."""
    questions = ["What is it?", "Which colour, and how many of them are there in this picture?", "Say."]
    out = []
    for i, question in enumerate(questions):
        parts = [{"type": "image"}, {"type": "text", "text": question}]
        files = [_png(tmp, SIZES[i], i)]
        if i == 1:
            parts.append({"type": "image"})
            files.append(_png(tmp, SIZES[2], 9))
        text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(Prompt(text, parse_images([str(f) for f in files], tmp)))
    return out


def _encoded(family, prompts):
    _, _, tokenizer, images = family
    return PairTokenizer(tokenizer, Budgets(None, None, None), images).encode_prompts(
        [p.text for p in prompts], [p.images for p in prompts])


def test_sampled_log_probs_are_the_models_own(tmp_path, family):
    """The sampler's log-prob of each drawn sequence (prefill once, cache repeated for 3 samples, decoded
    token by token at the model's positions: Qwen's 3-D ones, Gemma 3's image blocks) equals the trainer's
    score of the finished sequence, itself equal to the model's own forward
    (tests/test_vision_families.py)."""
    name, directory, tokenizer, images = family
    model = load_model(str(directory)).double()
    prompts = _prompts(tmp_path, tokenizer)
    ids = _encoded(family, prompts)
    drawn = sample_with_images(model, images, ids, [p.images for p in prompts], num_samples=3,
                               max_new_tokens=6, stop_ids=[tokenizer.eos_token_id],
                               pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert len(drawn.tokens) == 9 and all(1 <= len(t) <= 6 for t in drawn.tokens)
    pairs = [TokenizedPair(tuple(ids[j // 3]), tuple(t), (t[-1],), images=prompts[j // 3].images,
                           image_positions=tuple(i for i, x in enumerate(ids[j // 3])
                                                 if x == images.feature_token_id))
             for j, t in enumerate(drawn.tokens)]
    batch = collate(pairs, layout="prefix_shared", pad_id=tokenizer.pad_token_id, images=images)
    expected = SequenceScorer(model)(batch).chosen
    # a float64 model, fp32 logits on both sides (the head): each token's log-prob within a few eps of its
    # logits' size, summed over <= 6 tokens: 8 eps of each sum (as tests/test_vision_families.py)
    assert_logps_close(torch.tensor(drawn.logps, dtype=torch.float64), expected.double(), rtol=8 * FP32_EPS)


def test_the_vision_tower_runs_once_per_batch_whatever_the_samples(tmp_path, family):
    name, directory, tokenizer, images = family
    model = load_model(str(directory))
    tower = next(m for n, m in model.model.named_children() if n in VISION_TOWERS)
    seen = []
    tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(next(v for v in [*args, *kwargs.values()]
                                                 if isinstance(v, torch.Tensor)).shape[0]), with_kwargs=True)
    prompts = _prompts(tmp_path, tokenizer)
    for k in (1, 4):
        sample_continuations(model, tokenizer, prompts, num_samples=k, max_new_tokens=3, images=images)
    assert len(seen) == 2 and seen[0] == seen[1]  # 4 images: one pass each time, not one per sample


def test_seeds_reproduce_and_prompts_mix_with_text(tmp_path, family):
    name, directory, tokenizer, images = family
    model = load_model(str(directory))
    prompts = [*_prompts(tmp_path, tokenizer), Prompt("Once upon a time")]  # the last has no image
    runs = [sample_continuations(model, tokenizer, prompts, num_samples=2, max_new_tokens=5, seed=s,
                                 batch_size=8, images=images) for s in (3, 3, 4)]
    texts = [[s.completion_ids for g in run for s in g] for run in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert [len(g) for g in runs[0]] == [2, 2, 2, 2]
    assert runs[0][1][0].images == prompts[1].images and runs[0][3][0].images == ()
    # the samples score under the trainer with their images (a KL estimate's input)
    logps = sequence_logps(model, [s for g in runs[0] for s in g], images=images)
    assert logps.shape == (8,) and torch.isfinite(logps).all() and (logps <= 0).all()


def test_greedy_answers_equal_generate(tmp_path, inputs_llava):
    """Where the model's ``generate`` takes the batch as is (LLaVA: a fixed count per image), its greedy
    answers equal the sampler's."""
    directory, tokenizer, images = inputs_llava
    model = load_model(str(directory))
    prompts = [p for p in _prompts(tmp_path, tokenizer) if len(p.images) == 1]
    ids = PairTokenizer(tokenizer, Budgets(None, None, None), images).encode_prompts(
        [p.text for p in prompts], [p.images for p in prompts])
    ours = sample_with_images(model, images, ids, [p.images for p in prompts], greedy=True, max_new_tokens=6,
                              stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id).tokens
    width = max(len(p) for p in ids)
    pad = tokenizer.pad_token_id
    out = model.generate(input_ids=torch.tensor([[pad] * (width - len(p)) + p for p in ids]),
                         attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids]),
                         pixel_values=images.pixel_values([r for p in prompts for r in p.images]),
                         do_sample=False, max_new_tokens=6, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)[:, width:].tolist()
    for mine, theirs in zip(ours, out):
        assert mine == theirs[: len(mine)]


@pytest.fixture(scope="module")
def inputs_llava(tmp_path_factory):
    directory = build_tiny_vlm(tmp_path_factory.mktemp("llava") / "model", seed=0)
    tokenizer = load_tokenizer(str(directory))
    return directory, tokenizer, load_image_inputs(str(directory), tokenizer)


def test_a_text_model_refuses_prompts_with_images(tmp_path):
    from helpers import save_tiny_model

    directory = save_tiny_model(tmp_path / "text")
    prompt = Prompt("Hi", parse_images([str(_png(tmp_path, (16, 16), 0))], tmp_path), origin="p.jsonl: row 3")
    with pytest.raises(ValueError, match=r"^p.jsonl: row 3: field 'images': the model is text-only"):
        sample_continuations(load_model(str(directory)), load_tokenizer(str(directory)), [prompt])


def test_truncation_never_cuts_an_image(tmp_path, inputs_llava):
    directory, tokenizer, images = inputs_llava
    prompt = _prompts(tmp_path, tokenizer)[0]
    model = load_model(str(directory))
    full = len(_encoded(("llava", directory, tokenizer, images), [prompt])[0])
    kept = sample_continuations(model, tokenizer, [prompt], max_new_tokens=2, images=images,
                                max_prompt_tokens=full - 1)[0][0]
    assert images.image_token_count(kept.prompt_ids) == 16  # text before the image went, not the image
    with pytest.raises(ValueError, match="image tokens do not fit max_prompt_length 10"):
        sample_continuations(model, tokenizer, [prompt], images=images, max_prompt_tokens=10)
