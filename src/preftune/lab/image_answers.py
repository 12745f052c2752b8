"""Sampling and scoring answers to prompts with images (image-text models, see model/vision.py).

``sample_answers`` draws completions with the model's own ``generate`` (the image features are
computed by the model from ``pixel_values``, the placeholders already expanded in the prompt ids);
``answer_logps`` scores completions exactly as training does (``SequenceScorer`` over a packed
batch, each image encoded once), so KL estimates use the trainer's log-probs:

    KL(pi || pi_ref) ~= mean_{y ~ pi} [log pi(y | x) - log pi_ref(y | x)]     (nats per answer)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from preftune.data.batching import collate
from preftune.data.images import ImageInputs, ImageRef
from preftune.data.tokenize import TokenizedPair
from preftune.model.logps import SequenceScorer


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {s for s in stops if s is not None}


@torch.no_grad()
def sample_answers(model: nn.Module, tokenizer, images: ImageInputs, prompts: Sequence[list[int]],
                   prompt_images: Sequence[tuple[ImageRef, ...]], *, num_samples: int = 1,
                   max_new_tokens: int = 8, temperature: float = 1.0, greedy: bool = False, seed: int = 0,
                   batch_size: int = 64) -> list[list[tuple[int, ...]]]:
    """``num_samples`` completions per prompt, each ending at (and including) its first stop token;
    ``[P][num_samples]`` tuples of ids. ``prompts``: expanded prompt ids
    (PairTokenizer.encode_prompts)."""
    torch.manual_seed(seed)
    stops, pad = _stop_ids(model, tokenizer), tokenizer.pad_token_id
    model.eval()
    out: list[list[tuple[int, ...]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk, refs = prompts[start : start + batch_size], prompt_images[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        k = 1 if greedy else num_samples
        # the chunk's images processed once; rows are prompt 0 k times, prompt 1 k times, ...: each copy
        # reads its own prompt's images, in order
        starts = [0]
        for rs in refs:
            starts.append(starts[-1] + len(rs))
        order = [j for i in range(len(chunk)) for _ in range(k) for j in range(starts[i], starts[i + 1])]
        pixels = {key: value.index_select(0, torch.tensor(order))
                  for key, value in images.pixel_inputs([r for rs in refs for r in rs]).items()}
        generated = model.generate(input_ids=ids.repeat_interleave(k, 0),
                                   attention_mask=mask.repeat_interleave(k, 0), **pixels,
                                   do_sample=not greedy, temperature=temperature if not greedy else None,
                                   top_k=0 if not greedy else None, top_p=1.0 if not greedy else None,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad)[:, width:]
        rows = [_cut(row.tolist(), stops) for row in generated]
        for i in range(len(chunk)):
            out.append(rows[i * k : (i + 1) * k] * (num_samples if greedy else 1))
    return out


def _cut(ids: list[int], stops: set[int]) -> tuple[int, ...]:
    for i, t in enumerate(ids):
        if t in stops:
            return tuple(ids[: i + 1])
    return tuple(ids)


@torch.no_grad()
def answer_logps(scorer: SequenceScorer, images: ImageInputs, prompts: Sequence[list[int]],
                 prompt_images: Sequence[tuple[ImageRef, ...]], answers: Sequence[tuple[int, ...]],
                 batch_size: int = 64) -> Tensor:
    """``[P]`` fp32 log pi(answer_i | prompt_i) (summed over the answer's tokens)."""
    pairs = [TokenizedPair(tuple(p), tuple(a), (), images=refs,
                           image_positions=tuple(j for j, t in enumerate(p) if t == images.feature_token_id))
             for p, refs, a in zip(prompts, prompt_images, answers)]
    pieces = []
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], layout="packed", images=images)
        pieces.append(scorer(batch).chosen)
    return torch.cat(pieces)
