"""Text pairs -> token-id pairs, with length budgets.

The prompt is tokenized once (with the tokenizer's special tokens, e.g. BOS); each completion is
the continuation of the prompt's tokens and ends with EOS (one: a completion a chat template already
ends with EOS, plus only whitespace, gets no second one). Truncation policy, applied in order:

1. the prompt keeps its *last* ``max_prompt_length`` tokens (a leading BOS is kept);
2. each completion keeps its *first* ``max_completion_length`` tokens (EOS goes when cut);
3. each completion is cut further so that prompt + completion <= ``max_length``; a prompt that
   would leave no room is first cut (from its start) to ``max_length - 1`` tokens.

An empty completion (``""`` or only whitespace) is EOS alone, counted in
``TokenizedData.empty_completions``. A pair carries no signal, so is dropped and counted, never
trained on, when its chosen text equals its rejected text (``dropped_equal``) or when their ids
are equal after tokenization and truncation (``dropped_identical``); ``first_dropped`` names the
first pair dropped for any reason.

Images (``PairTokenizer(..., images=ImageInputs)``) are part of the prompt: each placeholder the
prompt text holds (a text prompt with none gets one per image after BOS) becomes the image's
expansion (``ImageInputs.expansion``: its image tokens, which its features fill, and the family's
structure tokens around them). Truncation never cuts an image: the prompt
loses only text before its first image, and a pair whose images do not fit ``max_prompt_length``
(nor ``max_length - 1``) is dropped and counted (``dropped_images``). A conversational prompt loses
whole text turns before its first image first (the fewest that make it fit), then text tokens.

SFT examples (:meth:`PairTokenizer.tokenize_sft`) become pairs with ``rejected_ids=()`` and a
token-level ``chosen_mask`` marking the trained tokens; one left with no trained token after
truncation is dropped and counted (``TokenizedData.dropped_untrained``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from preftune.data.formats import PreferencePair, SFTExample, UnpairedExample
from preftune.data.images import ImageInputs, ImageRef

# the pair types are re-exported: trainers, tests and benchmarks import them here
from preftune.data.tokenized import (  # noqa: F401
    DROP_REASONS,
    TokenizedData,
    TokenizedPair,
    fingerprint_of,
    pair_key,
)


@dataclass(frozen=True)
class Budgets:
    """Token budgets; ``None`` means unlimited."""

    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        both = self.max_length is not None and self.max_prompt_length is not None
        if both and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < "
                             f"max_length ({self.max_length})")


def _segment_mask(offsets: Sequence[tuple[int, int]], segments: Sequence[tuple[str, bool]],
                  base: int) -> list[bool]:
    """Per token: the flag of the segment its first character is in (segment texts laid end to end
    from character ``base``). A token with an empty span (an added special token) takes the flag of
    the token before it (the first segment's for the first token)."""
    starts, flags, pos = [], [], base
    for text, trained in segments:
        starts.append(pos)
        flags.append(trained)
        pos += len(text)
    flag = bool(flags) and flags[0]
    out = []
    for start, end in offsets:
        if end > start:  # bisect_right: of segments starting at the same place (empty ones), the last
            flag = flags[max(bisect_right(starts, start) - 1, 0)]
        out.append(flag)
    return out


def truncate_prompt(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The prompt's last ``limit`` ids; a leading BOS is kept."""
    if len(ids) <= limit:
        return ids
    keep_bos = bos_id is not None and ids[:1] == [bos_id] and limit > 1
    return [bos_id, *ids[len(ids) - limit + 1 :]] if keep_bos else ids[len(ids) - limit :]


def single_sequence(prompt_ids: Sequence[int], completion_ids: Sequence[int], refs: Sequence[ImageRef] = (),
                    images: ImageInputs | None = None) -> TokenizedPair:
    """A prompt and one completion (a sample, a rollout) as a pair without a rejected side, its prompt's
    images (``refs``) placed at their tokens (``images``: the model's, needed when there are refs)."""
    if not refs:
        return TokenizedPair(tuple(prompt_ids), tuple(completion_ids), ())
    if images is None:
        raise ValueError("a sample with images needs the model's ImageInputs (images=...)")
    return TokenizedPair(tuple(prompt_ids), tuple(completion_ids), (), images=tuple(refs),
                         image_positions=images.feature_positions(prompt_ids))


class PairTokenizer:
    """Tokenizes pairs under ``Budgets``. Works with tokenizers that have no pad token."""

    def __init__(self, tokenizer: Any, budgets: Budgets, images: ImageInputs | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; completions must end with one")
        self.tokenizer, self.budgets, self.images = tokenizer, budgets, images
        self.fast_path = True  # off for good if the backend's ids ever differ from the tokenizer's

    def _with_images(self, ids: list[int], images: tuple[ImageRef, ...], origin: str) -> list[int]:
        """Prompt ids with every image placeholder replaced by its image's expansion (its tokens)."""
        inputs = self.images
        if inputs is None:
            if images:
                raise ValueError(f"{origin}: field 'images': this run takes no images (its model is "
                                 "text-only, or the command has none: dpo, sft and kto-style losses train "
                                 "on images)")
            return ids
        placed = ids.count(inputs.image_token_id)
        if images and not placed:  # a text prompt: its images come first (after BOS)
            at = 1 if ids[:1] == [self.tokenizer.bos_token_id] else 0
            ids = [*ids[:at], *[inputs.image_token_id] * len(images), *ids[at:]]
        elif placed != len(images):
            raise ValueError(f"{origin}: field 'images': {len(images)} image(s) but the rendered prompt "
                             f"holds {placed} {inputs.image_token!r} placeholder(s)")
        return inputs.expand(ids, images)

    def encode_prompts(self, prompts: Sequence[str],
                       images: Sequence[tuple[ImageRef, ...]]) -> list[list[int]]:
        """Prompt ids as training sees them (special tokens, image placeholders expanded), no budgets:
        what a sampler feeds the model."""
        return [self._with_images(ids, refs, "prompt")
                for ids, refs in zip(self._encode(list(prompts), True), images)]

    def _prompt_limit(self) -> int:
        b = self.budgets
        return min(b.max_prompt_length or 1 << 60, (b.max_length or 1 << 60) - 1)

    def _image_prompt(self, text: str, ids: list[int], example: Any) -> tuple[list[int], list[int]]:
        """(the whole prompt, the prompt to fit) with images expanded: when the whole one is over the
        prompt budget, the second has lost the fewest whole text turns before its first image that
        make it fit (``example.prompt_turns``); token-level truncation comes after, in ``_fit``."""
        full = self._with_images(ids, example.images, example.origin)
        turns = getattr(example, "prompt_turns", ())
        if not turns or len(full) <= self._prompt_limit():
            return full, full
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        if encoded["input_ids"] != ids:  # characters do not map onto these ids
            return full, full
        bos = ids[:1] if ids[:1] == [self.tokenizer.bos_token_id] else []
        for start in turns:
            k = next((j for j, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a >= start), None)
            if k is None:
                break
            cut = self._with_images([*bos, *ids[k:]], example.images, example.origin)
            if len(cut) <= self._prompt_limit():
                return full, cut
        return full, full

    def _image_positions(self, prompt: list[int]) -> tuple[int, ...]:
        if self.images is None:
            return ()
        return self.images.feature_positions(prompt)

    def _check_completion(self, ids: list[int], origin: str, key: str) -> None:
        if self.images is not None and self.images.image_token_id in ids:
            raise ValueError(f"{origin}: field {key!r}: holds an image placeholder; "
                             "images belong to the prompt")

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        backend = self._backend()
        if backend is not None:  # the Rust batch encoder, without offsets or masks: ids only
            ids = [e.ids for e in backend(texts, add_special_tokens=special)]
            if ids[0] == self._call([texts[0]], special)[0]:  # checked on each batch's first text
                return ids
            self.fast_path = False
        return self._call(texts, special)

    def _call(self, texts: list[str], special: bool) -> list[list[int]]:
        # verbose=False: the budgets below cut what is too long, so "longer than the maximum" is noise
        return self.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]

    def _backend(self) -> Any:
        """The fast tokenizer's own ``encode_batch_fast`` where it gives what ``tokenizer(...)`` gives
        (no truncation or padding set on it), else None."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.fast_path else None
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        return getattr(backend, "encode_batch_fast", backend.encode_batch)

    def _end_with_eos(self, ids: list[int]) -> list[int]:
        """``ids + [EOS]``, unless a chat template already ended the completion with EOS (then what
        follows that EOS, only whitespace such as a newline, is dropped): never EOS twice."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            last = len(ids) - 1 - ids[::-1].index(eos)
            if not self.tokenizer.decode(ids[last + 1 :]).strip():
                return ids[: last + 1]
        return [*ids, eos]

    def _completions(self, prompts: list[str], prompt_ids: list[list[int]],
                     completions: list[str]) -> list[list[int]]:
        """Ids of each completion as it continues its prompt: the joint tokenization's tail when
        the prompt's ids are a prefix of it, else the completion tokenized alone."""
        joint = self._encode([p + c for p, c in zip(prompts, completions)], special=True)
        tails = [j_ids[len(p_ids) :] if j_ids[: len(p_ids)] == p_ids else None
                 for p_ids, j_ids in zip(prompt_ids, joint)]
        apart = [i for i, tail in enumerate(tails) if tail is None]  # tokenized alone only where needed
        for i, ids in zip(apart, self._encode([completions[i] for i in apart], special=False)):
            tails[i] = ids
        eos = self.tokenizer.eos_token_id
        # an empty completion is EOS alone
        return [self._end_with_eos(ids) if text.strip() else [eos] for ids, text in zip(tails, completions)]

    def _fit(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        b = self.budgets
        prompt = truncate_prompt(prompt, self._prompt_limit(), self.tokenizer.bos_token_id)
        room = (b.max_length or 1 << 60) - len(prompt)
        return prompt, completion[: min(room, b.max_completion_length or 1 << 60)]

    def _fit_example(self, example: Any, prompt_ids: list[int], completions: dict[str, list[int]]
                     ) -> tuple[list[int], list[int], list[list[int]]] | None:
        """Check, expand the images of and fit one example: (whole prompt, fitted prompt, fitted
        completions, in the order given), or None when its image tokens do not fit the prompt budget."""
        self._check_prompt(prompt_ids, example.origin)
        for key, ids in completions.items():
            self._check_completion(ids, example.origin, key)
        whole, cut = self._image_prompt(example.prompt, prompt_ids, example)
        fitted = [self._fit(cut, ids) for ids in completions.values()]
        if self._images_cut(cut, fitted[0][0]):
            return None
        return whole, fitted[0][0], [c for _, c in fitted]

    def _images_cut(self, before: list[int], after: list[int]) -> bool:
        """True when truncating ``before`` to ``after`` lost an image token (the pair must be dropped)."""
        if self.images is None or len(after) == len(before):
            return False
        return self.images.image_token_count(after) != self.images.image_token_count(before)

    def tokenize_sequences(self, prompts: Sequence[str], completions: Sequence[str]) -> list[TokenizedPair]:
        """Single (prompt, completion) sequences, budgets applied, as pairs whose ``rejected_ids`` is
        a one-token EOS stub (for scoring one completion per prompt; the stub costs one token)."""
        prompts = list(prompts)
        prompt_ids = self._encode(prompts, special=True)
        out = []
        for p_ids, c_ids in zip(prompt_ids, self._completions(prompts, prompt_ids, list(completions))):
            self._check_prompt(p_ids, "prompt")
            p_fit, c_fit = self._fit(p_ids, c_ids)
            out.append(TokenizedPair(tuple(p_fit), tuple(c_fit), (self.tokenizer.eos_token_id,)))
        return out

    def tokenize(self, pairs: Sequence[PreferencePair]) -> TokenizedData:
        prompts = [p.prompt for p in pairs]
        prompt_ids = self._encode(prompts, special=True)
        chosen = self._completions(prompts, prompt_ids, [p.chosen for p in pairs])
        rejected = self._completions(prompts, prompt_ids, [p.rejected for p in pairs])
        out = TokenizedData()
        for pair, p_ids, c_ids, r_ids in zip(pairs, prompt_ids, chosen, rejected):
            if pair.chosen == pair.rejected:
                out.drop("dropped_equal", pair.origin)
                continue
            fitted = self._fit_example(pair, p_ids, {"chosen": c_ids, "rejected": r_ids})
            if fitted is None:
                out.drop("dropped_images", pair.origin)
                continue
            p_ids, p_fit, (c_fit, r_fit) = fitted
            out.truncated += (p_fit, c_fit, r_fit) != (p_ids, c_ids, r_ids)
            if c_fit == r_fit:
                out.drop("dropped_identical", pair.origin)
                continue
            out.empty_completions += (not pair.chosen.strip()) + (not pair.rejected.strip())
            out.pairs.append(
                TokenizedPair(tuple(p_fit), tuple(c_fit), tuple(r_fit), pair.preference, pair.origin,
                              pair.margin, images=pair.images, image_positions=self._image_positions(p_fit))
            )
        return out

    def tokenize_unpaired(self, examples: Sequence[UnpairedExample],
                          following: str | None = None) -> TokenizedData:
        """Pair example i with example i+1's completion for KTO's KL term; the last example takes
        ``following`` (the next chunk's first completion, when the data comes in chunks), else the
        first example's (cyclically)."""
        prompts = [e.prompt for e in examples]
        prompt_ids = self._encode(prompts, special=True)
        own = self._completions(prompts, prompt_ids, [e.completion for e in examples])
        shifted = [examples[(i + 1) % len(examples)].completion for i in range(len(examples))]
        if following is not None and shifted:
            shifted[-1] = following
        mismatched = self._completions(prompts, prompt_ids, shifted)
        out = TokenizedData()
        for ex, p_ids, c_ids, m_ids in zip(examples, prompt_ids, own, mismatched):
            fitted = self._fit_example(ex, p_ids, {"completion": c_ids, "mismatched": m_ids})
            if fitted is None:
                out.drop("dropped_images", ex.origin)
                continue
            p_ids, p_fit, (c_fit, m_fit) = fitted
            out.truncated += (p_fit, c_fit) != (p_ids, c_ids)
            out.empty_completions += not ex.completion.strip()
            out.pairs.append(TokenizedPair(tuple(p_fit), tuple(c_fit), tuple(m_fit), float(ex.label),
                                           ex.origin, images=ex.images,
                                           image_positions=self._image_positions(p_fit)))
        return out

    def _sft_completions(
        self, examples: Sequence[SFTExample], prompt_ids: list[list[int]]
    ) -> list[tuple[list[int], list[bool]]]:
        """(ids, mask) of each completion as it continues its prompt, EOS included (see tokenize_sft)."""
        tok = self.tokenizer
        out: list[tuple[list[int], list[bool]]] = []
        if not getattr(tok, "is_fast", False):  # no offsets: segment by segment, each tokenized alone
            for ex in examples:
                ids: list[int] = []
                mask: list[bool] = []
                for text, trained in ex.segments:
                    seg_ids = self._encode([text], special=False)[0] if text else []
                    ids += seg_ids
                    mask += [trained] * len(seg_ids)
                out.append((ids, mask))
        else:
            joint = tok([e.prompt + e.completion for e in examples], add_special_tokens=True,
                        return_offsets_mapping=True, verbose=False)
            alone_at = []
            for i, (ex, p_ids) in enumerate(zip(examples, prompt_ids)):
                j_ids, j_offsets = joint["input_ids"][i], joint["offset_mapping"][i]
                if j_ids[: len(p_ids)] == p_ids:
                    tail = slice(len(p_ids), None)
                    out.append((j_ids[tail], _segment_mask(j_offsets[tail], ex.segments, len(ex.prompt))))
                else:
                    alone_at.append(i)
                    out.append(([], []))
            if alone_at:
                alone = tok([examples[i].completion for i in alone_at], add_special_tokens=False,
                            return_offsets_mapping=True, verbose=False)
                for i, a_ids, a_offsets in zip(alone_at, alone["input_ids"], alone["offset_mapping"]):
                    out[i] = (list(a_ids), _segment_mask(a_offsets, examples[i].segments, 0))
        eos = tok.eos_token_id
        ended = []
        for ex, (ids, mask) in zip(examples, out):
            last_trained = bool(ex.segments) and ex.segments[-1][1]
            if not ex.completion.strip():  # an empty completion (only whitespace) is EOS alone
                ended.append(([eos], [last_trained]))
                continue
            full = self._end_with_eos(list(ids))
            ended.append((full, [*mask, last_trained] if len(full) > len(ids) else list(mask[: len(full)])))
        return ended

    def tokenize_sft(self, examples: Sequence[SFTExample]) -> TokenizedData:
        """SFT examples as pairs ``(prompt_ids, chosen_ids=completion + EOS, rejected_ids=())`` with
        ``preference=1`` and ``chosen_mask`` the trained tokens (``None`` when all of them are).

        The prompt is tokenized as in :meth:`tokenize` (special tokens, e.g. BOS) and the completion
        continues it as in ``_completions`` (the joint tokenization's tail, else alone). Masking: a
        token is trained iff the character it starts at lies in a trained segment, so a token that
        straddles a boundary goes with the segment it starts in; positions come from the fast
        tokenizer's character offsets. A slow tokenizer (no offsets) tokenizes segment by segment
        instead, each alone. EOS is trained iff the last segment is; an empty completion is EOS
        alone. Budgets as in :meth:`tokenize`;
        the mask is cut with the completion, and an example left with no trained token is dropped
        and counted in ``dropped_untrained`` (also in ``truncated`` when truncation did it).
        """
        prompt_ids = self._encode([e.prompt for e in examples], special=True)
        out = TokenizedData()
        completions = self._sft_completions(examples, prompt_ids)
        for ex, p_ids, (c_ids, mask) in zip(examples, prompt_ids, completions):
            fitted = self._fit_example(ex, p_ids, {"completion": c_ids})
            if fitted is None:
                out.drop("dropped_images", ex.origin)
                continue
            p_ids, p_fit, (c_fit,) = fitted
            mask = mask[: len(c_fit)]
            out.truncated += (p_fit, c_fit) != (p_ids, c_ids)
            if not any(mask):
                out.drop("dropped_untrained", ex.origin)
                continue
            out.empty_completions += not ex.completion.strip()
            chosen_mask = None if all(mask) else tuple(mask)
            out.pairs.append(TokenizedPair(tuple(p_fit), tuple(c_fit), (), 1.0, ex.origin,
                                           chosen_mask=chosen_mask, images=ex.images,
                                           image_positions=self._image_positions(p_fit)))
        return out

    @staticmethod
    def _check_prompt(prompt_ids: list[int], origin: str) -> None:
        if not prompt_ids:
            raise ValueError(
                f"{origin}: field 'prompt': empty after tokenization and the tokenizer adds no BOS token, "
                "so the first completion token has no context"
            )
