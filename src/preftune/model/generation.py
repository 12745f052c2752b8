"""Sampling continuations and scoring them exactly: the policy-side helpers of an evaluation.

Sampling: ``transformers`` ``generate`` in batches, left-padded, pure ancestral sampling at
temperature tau (``top_k=0``, ``top_p=1``: no truncation of the distribution), each batch seeded
with ``seed + batch index`` so two models given the same seed draw with the same random stream.

Scoring: the sampled token ids (not a re-tokenization of the text) are scored with
:class:`~preftune.model.logps.SequenceScorer`,

    log pi(y | x) = sum_t log pi(y_t | x, y_<t),

over the generated tokens, the stop token included when one was generated. A continuation cut
at ``max_new_tokens`` is scored as the prefix it is, so log pi(y | x) is the exact log-probability
of the sample under "sample at tau = 1 until a stop token or the length limit". Hence

    KL(pi_theta || pi_ref) = E_{y ~ pi_theta}[log pi_theta(y | x) - log pi_ref(y | x)]

is estimated without bias by the sample mean of the log-ratio over samples of pi_theta drawn at
tau = 1 (at tau != 1 the same mean is reported, but it is then not a KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from preftune.data.batching import collate
from preftune.data.images import ImageInputs, ImageRef
from preftune.data.rows import Prompt, as_prompt
from preftune.data.tokenize import Budgets, PairTokenizer, single_sequence, truncate_prompt
from preftune.model.logps import SequenceScorer

__all__ = ["Sample", "completion_logps", "kl_estimate", "sample_continuations", "sequence_logps"]


@dataclass(frozen=True)
class Sample:
    """One sampled continuation: ``completion_ids`` continue ``prompt_ids`` (stop token included
    when one was generated; the prompt's images expanded into their tokens); ``text`` is the decoded
    continuation, special tokens dropped; ``images``: the prompt's images."""

    prompt: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    text: str
    stopped: bool
    images: tuple[ImageRef, ...] = ()


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS, and BOS too: llama2.c story models end a story by starting the next one with BOS."""
    ids = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    return sorted({i for i in ids if i is not None})


def _cut(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The generated ids up to and including the first stop token."""
    for k, tok in enumerate(ids):
        if tok in stops:
            return ids[: k + 1], True
    return ids, False


def _continuation_text(tokenizer: Any, prompt_ids: list[int], body: list[int]) -> str:
    """Decode prompt + body and drop the decoded prompt, so a leading space survives decoding."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + body, skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt) :]
    return tokenizer.decode(body, skip_special_tokens=True)


def _shared_prompt_cache(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                         k: int) -> dict[str, Any]:
    """The KV cache of each left-padded prompt but its last token, from one forward pass, repeated
    ``k`` times along the batch: ``generate`` then computes only the last prompt token per sample."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    out = model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                use_cache=True)
    name = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.x calls it ``cache``
    cache = out[name]
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return {}
    cache.batch_repeat_interleave(k)
    return {name: cache}


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], images: ImageInputs | None,
                   max_prompt_tokens: int | None) -> list[list[int]]:
    """Prompt ids as training builds them: special tokens, each image placeholder replaced by its image's
    tokens (``images``: the model's); with ``max_prompt_tokens`` a longer prompt keeps its last tokens (and
    BOS), but never loses an image token (one line naming the prompt)."""
    if images is None:
        with_images = next((p for p in prompts if p.images), None)
        if with_images is not None:
            raise ValueError(f"{with_images.origin or 'prompt'}: field 'images': the model is text-only; "
                             "prompts with images need an image-text model")
        # verbose=False: too-long prompts are cut below
        encoded = [tokenizer(p.text, add_special_tokens=True, verbose=False)["input_ids"] for p in prompts]
    else:
        encoded = PairTokenizer(tokenizer, Budgets(None, None, None), images).encode_prompts(
            [p.text for p in prompts], [p.images for p in prompts])
    if max_prompt_tokens is None:
        return encoded
    out = []
    for prompt, ids in zip(prompts, encoded):
        cut = truncate_prompt(ids, max_prompt_tokens, tokenizer.bos_token_id)
        if images is not None and images.image_token_count(cut) != images.image_token_count(ids):
            raise ValueError(f"{prompt.origin or 'prompt'}: field 'images': the prompt's "
                             f"{images.image_token_count(ids)} image tokens do not fit max_prompt_length "
                             f"{max_prompt_tokens} (raise it)")
        out.append(cut)
    return out


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Prompt],
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    processes: tuple[int, int] = (0, 1),
    images: ImageInputs | None = None,
) -> list[list[Sample]]:
    """``num_samples`` continuations of each prompt; ``out[i][k]`` is sample k of prompt i.

    ``processes = (index, count)``: this process draws batch ``b`` only when ``b mod count == index``
    (the other prompts get ``[]``); the processes of a run together draw exactly one process's samples.

    Batches hold whole prompts (each repeated ``num_samples`` times); batch ``b`` draws from
    ``seed + b`` (``torch.manual_seed`` inside a forked RNG), so the global RNG is left untouched. With
    ``num_samples > 1`` each prompt is computed once: its KV cache is built from one forward pass
    and repeated for its samples (the samples equal those of repeating the prompt). With
    ``max_prompt_tokens``, a longer prompt keeps its last tokens (and BOS), as in training.

    Prompts with images (:class:`~preftune.data.rows.Prompt`; ``images``: the model's
    :class:`~preftune.data.images.ImageInputs`) are drawn by
    :func:`~preftune.model.image_sampling.sample_with_images`: each image encoded once per batch, each
    prompt's cache reused by its samples.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    prompts = [as_prompt(p) for p in prompts]
    encoded = encode_prompts(tokenizer, prompts, images, max_prompt_tokens)
    per_batch = max(1, batch_size // num_samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[Sample]] = []
    index, count = processes
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        if b % count != index:  # another process's batch
            out.extend([] for _ in prompts[start : start + per_batch])
            continue
        chunk = encoded[start : start + per_batch]
        refs = [p.images for p in prompts[start : start + per_batch]]
        if any(refs):
            from preftune.model.image_sampling import sample_with_images

            generated = sample_with_images(model, images, chunk, refs, num_samples=num_samples,
                                           temperature=temperature, max_new_tokens=max_new_tokens,
                                           stop_ids=stops, pad_id=pad,
                                           generator=torch.Generator(device).manual_seed(seed + b)).tokens
        else:
            generated = _generate(model, chunk, num_samples, seed + b, pad, stops, device,
                                  temperature=temperature, max_new_tokens=max_new_tokens)
        for j, row in enumerate(generated):
            i = start + j // num_samples
            ids, stopped = _cut(row, set(stops))
            body = ids[:-1] if stopped else ids
            sample = Sample(prompts[i].text, tuple(encoded[i]), tuple(ids),
                            _continuation_text(tokenizer, encoded[i], body), stopped, prompts[i].images)
            if j % num_samples == 0:
                out.append([])
            out[-1].append(sample)
    return out


def _generate(model: nn.Module, chunk: list[list[int]], num_samples: int, seed: int, pad: int,
              stops: list[int], device: torch.device, **sampling: Any) -> list[list[int]]:
    """``generate``'s continuations of text prompts (left-padded), ``num_samples`` per prompt (one shared
    prompt cache), drawn under ``seed``."""
    width = max(len(ids) for ids in chunk)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
    shared = (_shared_prompt_cache(model, input_ids, mask, num_samples)
              if num_samples > 1 and width > 1 else {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.generate(
            input_ids=input_ids.repeat_interleave(num_samples, 0), attention_mask=mask.repeat_interleave(
                num_samples, 0), do_sample=True, top_k=0, top_p=1.0, eos_token_id=stops, pad_token_id=pad,
            **sampling, **shared,
        )[:, width:].tolist()


@torch.no_grad()
def completion_logps(scorer: SequenceScorer, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]],
                     prompt_images: Sequence[tuple[ImageRef, ...]] | None = None, *,
                     images: ImageInputs | None = None, batch_size: int = 64) -> torch.Tensor:
    """``[n]`` log pi(completion_i | prompt_i) (fp32, on the CPU), summed over the completion's exact token
    ids; ``prompt_images``: each prompt's images (``images``: the model's
    :class:`~preftune.data.images.ImageInputs`)."""
    device = next(scorer.parameters()).device
    refs = prompt_images if prompt_images is not None else [()] * len(prompts)
    pairs = [single_sequence(p, c, r, images) for p, c, r in zip(prompts, completions, refs)]
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], layout="prefix_shared", images=images).to(device)
        out.append(scorer(batch).chosen.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def sequence_logps(model: nn.Module, samples: Sequence[Sample], *, batch_size: int = 64,
                   images: ImageInputs | None = None) -> torch.Tensor:
    """``[n]`` log pi(y | x) of each sample's exact token ids (:func:`completion_logps`)."""
    return completion_logps(SequenceScorer(model).eval(), [s.prompt_ids for s in samples],
                            [s.completion_ids for s in samples], [s.images for s in samples], images=images,
                            batch_size=batch_size)


@dataclass(frozen=True)
class KLEstimate:
    """Sample mean of log pi_theta(y|x) - log pi_ref(y|x) over y ~ pi_theta, and its standard error."""

    mean: float
    stderr: float
    per_token: float


def kl_estimate(policy: nn.Module, reference: nn.Module, samples: Sequence[Sample],
                images: ImageInputs | None = None) -> KLEstimate:
    """Monte Carlo KL(pi_theta || pi_ref) from samples of pi_theta (see the module docstring);
    ``per_token`` divides the summed log-ratio by the number of scored tokens."""
    ratio = (sequence_logps(policy, samples, images=images)
             - sequence_logps(reference, samples, images=images))
    n = ratio.numel()
    tokens = sum(len(s.completion_ids) for s in samples)
    std = float(ratio.std()) if n > 1 else 0.0
    return KLEstimate(float(ratio.mean()), std / math.sqrt(max(n, 1)), float(ratio.sum()) / max(tokens, 1))


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """P(r > r_base) + 1/2 P(r = r_base) over paired samples (same prompt and seed)."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError(f"win rate needs paired, non-empty rewards, got {len(rewards)} and {len(baseline)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)) / len(rewards)
