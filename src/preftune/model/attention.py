"""Unpadded forward: the batch's real tokens as one stream, attention computed per segment.

A packed or prefix-shared :class:`~preftune.data.batching.ForwardBatch` is ``[R, T]`` with
padding at the end of each row and a dense ``[R, 1, T, T]`` mask. Everything in a decoder layer
except attention is per token, so it may as well run on the ``N`` real tokens alone
(``N <= R*T``): :func:`unpad` gathers them into ``[1, N]`` (ids and positions), and attention,
the only op that mixes tokens, runs segment by segment on slices of the ``[1, heads, N, d]``
query/key/value states. For a prefix-shared segment ``prompt (P) + chosen (C) + rejected (Q)``:

    out[P + C] = SDPA(q[P+C], k[P+C], v[P+C], causal)
    out[Q]     = SDPA(q[Q], k[P ; Q], v[P ; Q], mask M),  M[i, j] = j < |P| or j - |P| <= i

(the rejected tokens see the whole prompt and their own past, never the chosen tokens; the second
call runs in blocks of queries, each given only the keys it may see); a packed sequence is one
causal call. No padding is computed anywhere, no ``T x T`` mask exists, and the attention scores
are about ``(P+C)^2/2 + Q P + Q^2/2`` per pair instead of ``(P+C+Q)^2``. Each query
attends to exactly the keys the dense mask allows, so the result equals the masked forward (to
fp32 rounding; the tests check 1e-5 in log-probs and gradients).

The per-segment calls reach the model through transformers' attention dispatch: importing this
module registers :func:`segment_sdpa` as ``"sdpa"`` in ``AttentionInterface``. It does exactly
what transformers' own SDPA attention does unless the call carries a :class:`SegmentPlan` (the
keyword ``preftune_segments``, passed down from the decoder's forward), so generation and every
other caller are unaffected. The scorer uses it only for model families whose attention forwards
the keyword (:data:`SUPPORTED_MODEL_TYPES`, each tested against its padded forward, with SDPA
attention and no sliding window shorter than a segment); any other model keeps the dense-mask
forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

#: the keyword that carries the plan from the decoder's forward to each attention call
PLAN_KEY = "preftune_segments"
#: model families whose attention layers pass ``**kwargs`` to the attention function unchanged
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                   "gemma", "phi", "phi3", "olmo2", "granite", "smollm3", "cohere",
                                   "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text"})


#: rejected queries per SDPA call: 256 cut a [3072, 4096] call's forward + backward by 37% on CPU
REJECTED_BLOCK = 256


@dataclass
class SegmentPlan:
    """The attention calls of one unpadded batch of ``num_tokens`` tokens.

    ``sizes``: per segment, in stream order, its ``(shared, chosen, rejected)`` token counts;
    ``masks``: per segment, the ``[rejected, shared + rejected]`` bool mask of its rejected calls
    (None without a rejected part); ``block``: rejected queries per call. ``calls`` counts the
    attention layers that used the plan.
    """

    sizes: list[tuple[int, int, int]]
    masks: list[Tensor | None]
    num_tokens: int
    block: int  # rejected queries per SDPA call (:func:`rejected_attention`)
    calls: int = 0

    @property
    def chunks(self) -> list[int]:
        """Lengths of the stream's chunks: ``shared + chosen``, then ``rejected`` if any, per segment."""
        return [n for p, c, r in self.sizes for n in ((p + c, r) if r else (p + c,))]


def segment_plan(sizes: Tensor, device: torch.device | str) -> SegmentPlan:
    """``[S, 3]`` long rows ``(shared, chosen, rejected)`` token counts, in stream order -> plan.

    A packed sequence is ``(n, 0, 0)``; a prefix-shared pair ``(|P|, |C|, |Q|)``. The rejected
    tokens' mask is lower-right causal: ``M[i, j] = j < |P| or j - |P| <= i``.
    """
    rows = [tuple(row) for row in sizes.tolist()]
    masks = [torch.ones(r, p + r, dtype=torch.bool, device=device).tril(diagonal=p) if r else None
             for p, _, r in rows]
    return SegmentPlan(rows, masks, sum(map(sum, rows)), REJECTED_BLOCK)


def segment_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' SDPA attention, or with ``preftune_segments=plan`` one or two SDPA calls per segment.

    Shapes: query ``[1, heads, N, d]``, key/value ``[1, kv_heads, N, d]`` -> ``[1, N, heads, d]``.
    The states are cut into segment chunks with ``split`` (whose backward is one concatenation), not by
    slicing the stream, whose backward would write each slice's gradient into a zero tensor of the
    whole stream; only the rejected call's prompt keys are a slice, of their own chunk.
    """
    plan: SegmentPlan | None = kwargs.pop(PLAN_KEY, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("segment attention has no logit soft-capping or attention sinks; use layout: padded")
    if query.shape[0] != 1 or query.shape[2] != plan.num_tokens:
        raise ValueError(f"a segment plan of {plan.num_tokens} tokens got queries of shape "
                         f"{tuple(query.shape)}")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    queries, keys, values = (states.split(plan.chunks, dim=2) for states in (query, key, value))
    outputs, k = [], 0
    for (shared, _, _), mask in zip(plan.sizes, plan.masks):
        outputs.append(nn.functional.scaled_dot_product_attention(
            queries[k], keys[k], values[k], dropout_p=dropout, is_causal=True, scale=scaling))
        if mask is not None:  # the rejected tokens: the prompt (the head of chunk k) and their own past
            key_pr = torch.cat([keys[k][:, :, :shared], keys[k + 1]], 2)
            value_pr = torch.cat([values[k][:, :, :shared], values[k + 1]], 2)
            outputs.extend(rejected_attention(queries[k + 1], key_pr, value_pr, mask, plan.block, dropout,
                                              scaling))
        k += 1 if mask is None else 2
    plan.calls += 1
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def rejected_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, block: int, dropout: float,
                       scaling: float | None) -> list[Tensor]:
    """The rejected tokens' attention, ``block`` queries per SDPA call.

    query ``[1, h, Q, d]``; key/value ``[1, h, P+Q, d]`` (prompt, then rejected); mask ``[Q, P+Q]``
    lower-right causal. Queries ``[r0, r1)`` see keys ``< P + r1`` only, so most of the masked-out
    upper triangle is never scored: ``Q P + Q^2/2 + Q block/2`` scores instead of ``Q (P+Q)``
    (an explicit mask makes SDPA score every position it is given). Each query's softmax is over
    its own row, so the blocks' outputs need no merging.
    """
    outputs, total = [], key.shape[2]
    shared = total - query.shape[2]
    r0 = 0
    for q in query.split(block, dim=2):
        r1 = r0 + q.shape[2]
        end = shared + r1
        k, v = (key, value) if end == total else (key[:, :, :end], value[:, :, :end])
        outputs.append(nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[r0:r1, :end], dropout_p=dropout, scale=scaling))
        r0 = r1
    return outputs


AttentionInterface.register("sdpa", segment_sdpa)


def supports_segments(decoder: nn.Module) -> bool:
    """Whether ``decoder`` (a transformers base model) can run :func:`unpad`'s batches."""
    config = decoder.config
    return (getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
            and config._attn_implementation == "sdpa")


@dataclass(frozen=True)
class Unpadded:
    """A batch's real tokens as one row: ``input_ids``/``position_ids`` ``[1, N]`` (position_ids
    ``[3, 1, N]`` for 3-D rotary positions); ``flat_to_stream``
    ``[R*T]`` maps a flat position of the padded batch to its stream position (-1 for padding)."""

    input_ids: Tensor
    position_ids: Tensor
    flat_to_stream: Tensor
    plan: SegmentPlan


def unpad(input_ids: Tensor, position_ids: Tensor, segments: Tensor,
          window: int | None = None) -> Unpadded | None:
    """Gather the segments of a ``[R, T]`` batch into one stream.

    ``segments`` ``[S, 4]`` long: each segment's flat start position in ``R*T`` and its
    ``(shared, chosen, rejected)`` token counts, in stream order. None when a segment spans more
    positions than a sliding attention window (the dense mask handles that).
    """
    segments = segments.to(input_ids.device)
    starts, sizes = segments[:, 0], segments[:, 1:]
    if window is not None and int((sizes[:, 0] + sizes[:, 1:].amax(1)).max()) > window:
        return None
    lengths = sizes.sum(1)
    # stream position s of segment k's j-th token sits at flat position starts[k] + j
    stream_start = torch.cumsum(lengths, 0) - lengths
    gather = torch.repeat_interleave(starts - stream_start, lengths) + torch.arange(int(lengths.sum()),
                                                                                     device=input_ids.device)
    flat_to_stream = torch.full((input_ids.numel(),), -1, dtype=torch.long, device=input_ids.device)
    flat_to_stream[gather] = torch.arange(gather.numel(), device=input_ids.device)
    positions = position_ids.reshape(*position_ids.shape[:-2], -1)[..., gather]  # [N], or [3, N] (mrope)
    return Unpadded(input_ids.reshape(-1)[gather][None], positions.unsqueeze(-2),
                    flat_to_stream, segment_plan(sizes, input_ids.device))


def sliding_window(decoder: nn.Module) -> int | None:
    """The sliding-attention window of ``decoder``'s config, if one is active."""
    window = getattr(decoder.config, "sliding_window", None)
    if not window or getattr(decoder.config, "use_sliding_window", True) is False:
        return None
    return int(window)
