"""Sampling from prompts with images: each prompt is computed once, its KV cache reused by its k samples.

``generate`` re-runs the vision tower for every copy of a prompt, and Qwen's 3-D positions and Gemma 3's
image masks are rebuilt there by rules of its own; preftune decodes itself, on the training path:

1. prefill: the left-padded prompts ``[P, W]`` run once through the decoder, the image features placed at
   the image tokens exactly as in training (:func:`~preftune.model.vision.image_text_inputs`, each image
   encoded once; Gemma 3's per-layer-type masks; Qwen's 3-D positions from
   :meth:`~preftune.data.images.ImageInputs.rope_positions`), giving the KV cache and the logits of each
   prompt's next token;
2. the cache and those logits are repeated k times along the batch (``[P k]`` rows, prompt-major);
3. decode: step t feeds every row's last token at position ``n_i + t`` (``n_i`` the position after
   prompt i: its length, or with mrope the next rotary position, the same in all three axes, as a text
   token gets) and draws the next token from ``softmax(logits / T)`` (pure ancestral sampling; the
   argmax when greedy), until every row has drawn a stop token or ``max_new_tokens``.

The logits are the model's (:meth:`~preftune.model.logps.SequenceScorer.logits`, its soft-capping
included), so a sample's log-probability under the sampler equals what the trainer scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from preftune.data.images import ImageInputs, ImageRef
from preftune.model.logps import SequenceScorer
from preftune.model.vision import image_text_inputs

__all__ = ["DrawnTokens", "sample_with_images"]


@dataclass(frozen=True)
class DrawnTokens:
    """``tokens[j]``: the ids drawn for row j (``num_samples`` rows per prompt, prompt-major), up to and
    including the first stop token; ``logps[j]``: their summed log-probability under the sampling
    distribution (``softmax(logits / T)``; under the model itself at T = 1)."""

    tokens: list[list[int]]
    logps: list[float]


def _cache_key(decoder: nn.Module) -> str:
    """The decoder's keyword for a KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _prompt_positions(images: ImageInputs, prompts: Sequence[Sequence[int]],
                      refs: Sequence[tuple[ImageRef, ...]], mask: Tensor) -> tuple[Tensor, Tensor]:
    """Position ids of the left-padded prompts (``[P, W]``, or ``[3, P, W]`` for mrope) and the position
    after each prompt ``[P]``."""
    if images.grid is None:
        return (mask.cumsum(-1) - 1).clamp(min=0), mask.sum(-1)
    width = mask.shape[1]
    positions = torch.zeros(3, len(prompts), width, dtype=torch.long)
    following = []
    for i, (ids, rs) in enumerate(zip(prompts, refs)):
        rope, after = images.rope_positions(ids, rs)
        positions[:, i, width - len(ids) :] = torch.tensor(rope, dtype=torch.long).T
        following.append(after)
    return positions.to(mask.device), torch.tensor(following, device=mask.device)


def _draw(logits: Tensor, temperature: float, greedy: bool, generator: torch.Generator | None
          ) -> tuple[Tensor, Tensor]:
    """``[N, V]`` fp32 logits -> (``[N]`` drawn ids, ``[N]`` their log-probabilities)."""
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if greedy:
        token = logprobs.argmax(-1)
    else:
        token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
    return token, logprobs.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def sample_with_images(model: nn.Module, images: ImageInputs, prompts: Sequence[Sequence[int]],
                       prompt_images: Sequence[tuple[ImageRef, ...]], *, num_samples: int = 1,
                       temperature: float = 1.0, max_new_tokens: int = 48, stop_ids: Sequence[int] = (),
                       pad_id: int = 0, greedy: bool = False,
                       generator: torch.Generator | None = None) -> DrawnTokens:
    """Draw ``num_samples`` continuations of each prompt (see the module docstring) in one batch.

    ``prompts``: ``P`` expanded prompt ids (image placeholders replaced by their images' tokens, as
    :meth:`~preftune.data.tokenize.PairTokenizer.encode_prompts` gives them), ``prompt_images``: each
    prompt's images in order. ``generator`` (on the model's device) seeds the draws, leaving the global RNG
    untouched.
    """
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature}")
    device = next(model.parameters()).device
    decoder, scorer = model.get_decoder(), SequenceScorer(model)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions, following = _prompt_positions(images, prompts, prompt_images, mask)
    flat_refs = [r for rs in prompt_images for r in rs]
    if flat_refs:  # the images' features at their tokens, in row order (rows hold their images in order)
        image_index = (ids == images.feature_token_id).flatten().nonzero().squeeze(1)
        per_row = [len(rs) for rs in prompt_images if rs]
        pixels = {k: v.to(device) for k, v in images.pixel_inputs(flat_refs, per_row).items()}
        inputs = image_text_inputs(model, ids, pixels, image_index, torch.arange(image_index.numel(),
                                                                                device=device))
    else:
        image_index, inputs = None, {"input_ids": ids}
    dtype = next(model.parameters()).dtype
    attention = scorer.decoder_mask(mask, image_index, positions, dtype, decoder)
    cache_key = _cache_key(decoder)
    from transformers import DynamicCache

    cache = DynamicCache()
    hidden = decoder(**inputs, attention_mask=attention, position_ids=positions, use_cache=True,
                     **{cache_key: cache}).last_hidden_state
    logits = scorer.logits(hidden[:, -1])
    k = num_samples
    cache.batch_repeat_interleave(k)
    logits, mask, following = (t.repeat_interleave(k, 0) for t in (logits, mask, following))
    rows = logits.shape[0]
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    drawn, logps = [], torch.zeros(rows, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        token, logp = _draw(logits, temperature, greedy, generator)
        logps += torch.where(done, 0.0, logp)
        drawn.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        step = (following + t)[:, None]
        position = step[None].expand(3, rows, 1) if images.grid is not None else step
        hidden = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                         **{cache_key: cache}).last_hidden_state
        logits = scorer.logits(hidden[:, -1])
    columns = torch.stack(drawn, dim=1).tolist()
    stop_set = set(stop_ids)
    tokens = []
    for row in columns:
        end = next((j + 1 for j, tok in enumerate(row) if tok in stop_set), len(row))
        tokens.append(row[:end])
    return DrawnTokens(tokens, logps.cpu().tolist())
