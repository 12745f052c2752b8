"""Sampling and scoring answers to prompts with images (image-text models, see model/vision.py).

``sample_answers`` draws completions with preftune's image sampler
(:func:`~preftune.model.image_sampling.sample_with_images`: each batch's images encoded once, each
prompt's KV cache reused for its samples); ``answer_logps`` scores completions exactly as training does
(:func:`~preftune.model.generation.completion_logps`, each image encoded once), so KL estimates use the
trainer's log-probs:

    KL(pi || pi_ref) ~= mean_{y ~ pi} [log pi(y | x) - log pi_ref(y | x)]     (nats per answer)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from preftune.data.images import ImageInputs, ImageRef
from preftune.model.generation import completion_logps
from preftune.model.image_sampling import sample_with_images
from preftune.model.logps import SequenceScorer


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {s for s in stops if s is not None}


def sample_answers(model: nn.Module, tokenizer, images: ImageInputs, prompts: Sequence[list[int]],
                   prompt_images: Sequence[tuple[ImageRef, ...]], *, num_samples: int = 1,
                   max_new_tokens: int = 8, temperature: float = 1.0, greedy: bool = False, seed: int = 0,
                   batch_size: int = 64) -> list[list[tuple[int, ...]]]:
    """``num_samples`` completions per prompt, each ending at (and including) its first stop token;
    ``[P][num_samples]`` tuples of ids (greedy: the one answer repeated). ``prompts``: expanded prompt
    ids (PairTokenizer.encode_prompts); batch ``b`` draws from ``seed + b``."""
    stops, pad = sorted(_stop_ids(model, tokenizer)), tokenizer.pad_token_id
    model.eval()
    k = 1 if greedy else num_samples
    out: list[list[tuple[int, ...]]] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        drawn = sample_with_images(model, images, prompts[start : start + batch_size],
                                   prompt_images[start : start + batch_size], num_samples=k,
                                   temperature=temperature, max_new_tokens=max_new_tokens, stop_ids=stops,
                                   pad_id=pad, greedy=greedy,
                                   generator=torch.Generator(model.device).manual_seed(seed + b))
        rows = [tuple(t) for t in drawn.tokens]
        out += [rows[i * k : (i + 1) * k] * (num_samples if greedy else 1) for i in range(len(rows) // k)]
    return out


def answer_logps(scorer: SequenceScorer, images: ImageInputs, prompts: Sequence[list[int]],
                 prompt_images: Sequence[tuple[ImageRef, ...]], answers: Sequence[tuple[int, ...]],
                 batch_size: int = 64) -> Tensor:
    """``[P]`` fp32 log pi(answer_i | prompt_i) (summed over the answer's tokens)."""
    return completion_logps(scorer, prompts, answers, prompt_images, images=images, batch_size=batch_size)
