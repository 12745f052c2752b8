"""Token-id pairs -> one forward batch. The layout is decided here, once, and undone once in
:func:`preftune.model.logps.sequence_logps` through the ``score_*`` index tensors; nothing after
that knows which layout was used.

Sequences are numbered ``0..2B-1``: sequence ``i`` is (prompt_i, chosen_i), sequence ``B + i`` is
(prompt_i, rejected_i). Only the chosen tokens that ``chosen_mask`` marks are scored (SFT: assistant
turns); a pair with no rejected tokens (SFT examples, PPO rollouts) is a single sequence, and its
rejected sequence scores nothing (log-prob 0, 0 tokens).

Layouts (all give the same per-sequence log-probs; tests check it to 1e-5):

* ``padded``: 2B rows ``prompt + completion``, right-padded, a 2-D padding mask.
* ``packed``: the 2B sequences concatenated into rows of at most ``pack_length`` tokens (default:
  the longest sequence) with no padding inside a row; positions restart per sequence;
  block-diagonal causal attention.
* ``prefix_shared``: one segment per pair, ``prompt + chosen + rejected``, the rejected tokens
  attending to the prompt but not to the chosen ones, and positioned right after the prompt
  (arXiv 2410.20305). The prompt is computed once instead of twice. Segments are packed into rows
  of at most ``pack_length`` tokens (default: the longest segment, so packing never widens a batch).

Images: a pair's images are encoded once per pair, whatever the layout. ``pixel_inputs`` holds each
pair's images in pair order; the model's image features, flattened to ``[image tokens, H]``,
are written at ``image_index`` (flat positions of image tokens) from rows ``image_feature``. In
``padded`` and ``packed`` layouts the chosen and the rejected sequence of a pair read the same rows;
in ``prefix_shared`` the prompt, image tokens included, is in the batch once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from preftune.data.images import ImageInputs
from preftune.data.tokenize import TokenizedPair

Layout = Literal["padded", "packed", "prefix_shared"]
LAYOUTS: tuple[str, ...] = ("padded", "packed", "prefix_shared")


@dataclass(frozen=True)
class ForwardBatch:
    """Everything one forward pass needs, and where its scored tokens are.

    input_ids, position_ids: ``[R, T]`` long (position_ids ``[3, R, T]`` for 3-D rotary positions:
                    Qwen2-VL's (t, h, w)).
    attention_mask: ``[R, T]`` long padding mask (``padded``: ``padding_mask``) or ``[R, 1, T, T]`` bool,
                    True = may attend, built from ``segments`` on first use (the unpadded forward never
                    needs it).
    score_index:    ``[N]`` flat index into ``R*T`` of the positions whose output predicts a scored token.
    score_target:   ``[N]`` the token id predicted there.
    score_sequence: ``[N]`` the sequence (``0..2B-1``) the token belongs to.
    last_index:     ``[2B]`` flat index of each sequence's final token (where a reward head reads).
    preference:     ``[B]`` float; margin: ``[B]`` float (reward-model margins, 0 by default);
    indices:        ``[B]`` dataset positions of the pairs.
    pixel_inputs:   the pairs' images as the image processor gives them (None without images):
                    ``pixel_values`` (``[I, C, H, W]``, or ``[I, tiles, C, H, W]``) and what the model's
                    ``get_image_features`` takes beside it (``image_sizes``, ``pixel_attention_mask``), one
                    entry per image along dim 0; image_index, image_feature: ``[M]`` flat positions of image
                    tokens and the feature row each one takes.
    segments:       ``[S, 4]`` long (packed, prefix_shared; None when padded): per segment, in row-major
                    order, its flat start position and its (shared, chosen, rejected) token counts --
                    what :func:`preftune.model.attention.unpad` needs to run the batch without padding.
    """

    input_ids: Tensor
    position_ids: Tensor
    padding_mask: Tensor | None
    score_index: Tensor
    score_target: Tensor
    score_sequence: Tensor
    last_index: Tensor
    preference: Tensor
    margin: Tensor
    indices: Tensor
    num_real_tokens: int
    pixel_inputs: dict[str, Tensor] | None = None
    image_index: Tensor | None = None
    image_feature: Tensor | None = None
    segments: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.preference.shape[0])

    @functools.cached_property
    def attention_mask(self) -> Tensor:
        if self.padding_mask is not None:
            return self.padding_mask
        return dense_mask(self.segments, *self.input_ids.shape)

    def to(self, device: torch.device | str) -> ForwardBatch:
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                 for f in fields(self)}
        if self.pixel_inputs is not None:
            moved["pixel_inputs"] = {k: v.to(device) for k, v in self.pixel_inputs.items()}
        return ForwardBatch(**moved)


def dense_mask(segments: Tensor, rows: int, width: int) -> Tensor:
    """``[R, 1, T, T]`` bool: token ``i`` may attend to ``j <= i`` of its segment, where a segment's
    chosen and rejected tokens see its shared tokens and their own branch only (``segments`` as in
    :class:`ForwardBatch`); a padding position attends only to itself."""
    segment_id = -1 - torch.arange(width, device=segments.device).repeat(rows, 1)
    branch = torch.zeros((rows, width), dtype=torch.long, device=segments.device)
    for k, (flat, shared, first, second) in enumerate(segments.tolist()):
        row, col = divmod(flat, width)
        segment_id[row, col : col + shared + first + second] = k
        branch[row, col + shared : col + shared + first] = 1
        branch[row, col + shared + first : col + shared + first + second] = 2
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    same = segment_id[:, :, None] == segment_id[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return (same & visible & causal)[:, None]


@dataclass
class _Segment:
    """A run of tokens that attend only within the run: ``sizes`` = (shared, chosen, rejected) token
    counts; the shared tokens are seen by all, chosen and rejected only by their own branch."""

    ids: list[int]
    positions: list[int]
    scores: list[tuple[int, int, int]]  # (local position, target id, sequence number)
    ends: list[tuple[int, int]]  # (local position of a sequence's last token, sequence number)
    images: list[tuple[int, int]]  # (local position of an image token, the image-feature row it takes)
    sizes: tuple[int, int, int]  # tokens (shared, chosen, rejected): (n, 0, 0) for one sequence
    # 3-D rotary positions (mrope families): the prompt's, per prompt position, and the position that
    # follows the prompt (a completion token at 1-D position q >= len(prompt) is at next + q - len(prompt))
    rope: tuple[list[tuple[int, ...]], int] | None = None

    def rope_positions(self) -> list[tuple[int, ...]]:
        """``[n][3]`` positions of the segment's tokens (from its 1-D ``positions``)."""
        prompt, following = self.rope
        n_p = len(prompt)
        return [prompt[q] if q < n_p else (following + q - n_p,) * 3 for q in self.positions]


def _scored(completion: tuple[int, ...], mask: tuple[bool, ...] | None) -> list[tuple[int, int]]:
    """(offset in the completion, token id) of the completion tokens that are scored."""
    return [(k, tok) for k, tok in enumerate(completion) if mask is None or mask[k]]


def _sequence_segment(prompt: tuple[int, ...], completion: tuple[int, ...], seq: int,
                      mask: tuple[bool, ...] | None = None,
                      images: list[tuple[int, int]] | None = None) -> _Segment:
    ids = [*prompt, *completion]
    n_p = len(prompt)
    scores = [(n_p - 1 + k, tok, seq) for k, tok in _scored(completion, mask)]
    return _Segment(ids, list(range(len(ids))), scores, [(len(ids) - 1, seq)], images or [],
                    (len(ids), 0, 0))


def _image_rows(pairs: Sequence[TokenizedPair]) -> list[list[tuple[int, int]]]:
    """Per pair, (prompt position, feature row) of each image token: pair ``i``'s k-th image token
    takes row ``k`` after all the image tokens of the pairs before it."""
    out, base = [], 0
    for p in pairs:
        out.append([(pos, base + k) for k, pos in enumerate(p.image_positions)])
        base += len(p.image_positions)
    return out


def _shared_segment(pair: TokenizedPair, i: int, num_pairs: int, images: list[tuple[int, int]]) -> _Segment:
    p, c, r = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    n_p, n_c = len(p), len(c)
    ids = [*p, *c, *r]
    positions = [*range(n_p + n_c), *range(n_p, n_p + len(r))]
    scores = [(n_p - 1 + k, tok, i) for k, tok in _scored(c, pair.chosen_mask)]
    # the first rejected token is predicted from the last prompt token, the rest from rejected tokens
    scores += [(n_p - 1 if k == 0 else n_p + n_c + k - 1, tok, num_pairs + i) for k, tok in enumerate(r)]
    ends = [(n_p + n_c - 1, i), (len(ids) - 1, num_pairs + i)]
    return _Segment(ids, positions, scores, ends, images, (n_p, n_c, len(r)))


def _pack(segments: list[_Segment], pack_length: int | None) -> list[list[_Segment]]:
    """First-fit decreasing: longest segments first, each into the first row with room for it.

    Rows hold at most ``pack_length`` tokens; with None, at most the longest segment's length, so
    short segments share rows without widening the batch (fewer rows, less padding).
    """
    capacity = pack_length if pack_length is not None else max(len(s.ids) for s in segments)
    rows: list[list[_Segment]] = []
    used: list[int] = []
    for seg in sorted(segments, key=lambda s: -len(s.ids)):
        n = len(seg.ids)
        row = next((r for r, u in enumerate(used) if u + n <= capacity), None)
        if row is None:
            rows.append([seg])
            used.append(n)
        else:
            rows[row].append(seg)
            used[row] += n
    return rows


def collate(
    pairs: Sequence[TokenizedPair],
    indices: Sequence[int] | None = None,
    *,
    layout: Layout = "prefix_shared",
    pack_length: int | None = None,
    pad_id: int = 0,
    images: ImageInputs | None = None,
) -> ForwardBatch:
    """Build the forward batch of ``pairs`` in the given layout (``images``: the model's image
    processor, needed when pairs have images)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not pairs:
        raise ValueError("collate needs at least one pair")
    b = len(pairs)
    segments = _layout_segments(pairs, layout)
    if images is not None and images.grid is not None:  # 3-D rotary positions
        owners = pairs if layout == "prefix_shared" else [*pairs, *(p for p in pairs if p.rejected_ids)]
        for seg, pair in zip(segments, owners, strict=True):
            seg.rope = images.rope_positions(pair.prompt_ids, pair.images)
    rows = [[s] for s in segments] if layout == "padded" else _pack(segments, pack_length)
    width = max(sum(len(s.ids) for s in row) for row in rows)
    placed = _place(rows, width, 2 * b, pad_id)

    padding_mask = None
    if layout == "padded":  # one sequence per row, from column 0
        lengths = torch.tensor([len(row[0].ids) for row in rows])
        padding_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return ForwardBatch(
        input_ids=placed.input_ids,
        position_ids=placed.position_ids,
        padding_mask=padding_mask,
        score_index=torch.tensor(placed.score_index, dtype=torch.long),
        score_target=torch.tensor(placed.score_target, dtype=torch.long),
        score_sequence=torch.tensor(placed.score_sequence, dtype=torch.long),
        last_index=torch.tensor(placed.last_index, dtype=torch.long),
        preference=torch.tensor([p.preference for p in pairs], dtype=torch.float32),
        margin=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        indices=torch.tensor(list(indices) if indices is not None else range(b), dtype=torch.long),
        num_real_tokens=sum(len(s.ids) for s in segments),
        segments=None if layout == "padded" else torch.tensor(placed.segment_rows, dtype=torch.long),
        **_image_fields(pairs, placed.image_index, placed.image_feature, images),
    )


def _layout_segments(pairs: Sequence[TokenizedPair], layout: Layout) -> list[_Segment]:
    """One segment per pair (``prefix_shared``), else one per sequence: the chosen ones (0..B-1),
    then the rejected ones (B..2B-1) of the pairs that have rejected tokens."""
    b = len(pairs)
    image_rows = _image_rows(pairs)
    if layout == "prefix_shared":
        return [_shared_segment(p, i, b, image_rows[i]) for i, p in enumerate(pairs)]
    segments = [_sequence_segment(p.prompt_ids, p.chosen_ids, i, p.chosen_mask, image_rows[i])
                for i, p in enumerate(pairs)]
    # single sequences (SFT, PPO rollouts) have no rejected side: no segment is built for it
    segments += [_sequence_segment(p.prompt_ids, p.rejected_ids, b + i, images=image_rows[i])
                 for i, p in enumerate(pairs) if p.rejected_ids]
    return segments


@dataclass
class _Placement:
    """Rows of segments laid out in ``[R, T]`` tensors; every index is flat (``row * T + column``)."""

    input_ids: Tensor  # [R, T], padded with pad_id
    position_ids: Tensor  # [R, T] ([3, R, T] with 3-D rotary positions), 0 at padding
    score_index: list[int]  # per scored token: where its prediction is made
    score_target: list[int]  # ... the token id it predicts
    score_sequence: list[int]  # ... the sequence it belongs to
    last_index: list[int]  # per sequence: its last token (0 for a sequence with no segment)
    image_index: list[int]  # per image token: where it is
    image_feature: list[int]  # ... the image-feature row it takes
    segment_rows: list[tuple[int, ...]]  # per segment: (start, shared, chosen, rejected)


def _place(rows: list[list[_Segment]], width: int, num_sequences: int, pad_id: int) -> _Placement:
    """Lay each row's segments side by side from column 0 into a batch ``width`` tokens wide."""
    n_rows = len(rows)
    rope = rows[0][0].rope is not None
    out = _Placement(torch.full((n_rows, width), pad_id, dtype=torch.long),
                     torch.zeros((3, n_rows, width) if rope else (n_rows, width), dtype=torch.long),
                     [], [], [], [0] * num_sequences, [], [], [])
    for r, row in enumerate(rows):
        start = 0
        for seg in row:
            n = len(seg.ids)
            out.input_ids[r, start : start + n] = torch.tensor(seg.ids)
            if rope:
                out.position_ids[:, r, start : start + n] = torch.tensor(seg.rope_positions()).T
            else:
                out.position_ids[r, start : start + n] = torch.tensor(seg.positions)
            for local, target, seq in seg.scores:
                out.score_index.append(r * width + start + local)
                out.score_target.append(target)
                out.score_sequence.append(seq)
            for local, seq in seg.ends:
                out.last_index[seq] = r * width + start + local
            for local, feature_row in seg.images:
                out.image_index.append(r * width + start + local)
                out.image_feature.append(feature_row)
            out.segment_rows.append((r * width + start, *seg.sizes))
            start += n
    return out


def _image_fields(pairs: Sequence[TokenizedPair], index: list[int], feature: list[int],
                  images: ImageInputs | None) -> dict[str, Tensor]:
    refs = [ref for p in pairs for ref in p.images]
    if not refs:
        return {}
    if images is None:
        raise ValueError("these pairs have images: collate needs the model's ImageInputs (images=...)")
    pixels = images.pixel_inputs(refs, [len(p.images) for p in pairs if p.images])
    return {"pixel_inputs": pixels, "image_index": torch.tensor(index, dtype=torch.long),
            "image_feature": torch.tensor(feature, dtype=torch.long)}
