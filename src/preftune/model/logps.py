"""Per-sequence log-probs from one forward pass.

    log pi(y | x) = sum_{t in completion(y)} log softmax(W h_{t-1})[y_t]

The decoder runs once over the whole :class:`ForwardBatch` (chosen and rejected together, in any
layout). The output layer is applied only at the ``N`` scored positions, in chunks of
``chunk_size`` rows, and each chunk keeps only ``logit[target] - logsumexp(logits)``: the
``[N, vocab]`` logits never exist at once. With gradients, each chunk's logits are recomputed in
the backward pass and turned into their gradient in place (:class:`HeadLogps`), so one
``[chunk, vocab]`` buffer is alive at a time -- unless the scorer keeps the probabilities
(``keep_probs``: when the decoder keeps all its activations too, checkpointing ``off``), which
trades ``[N, vocab]`` fp32 for the recomputing matmul, a quarter of the output layer's work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from preftune.data.batching import ForwardBatch
from preftune.losses.base import SequenceLogps
from preftune.model.attention import PLAN_KEY, Unpadded, sliding_window, supports_segments, unpad
from preftune.model.checkpointing import keeps_head_probs
from preftune.model.vision import BIDIRECTIONAL_IMAGES, image_attention_masks, image_text_inputs


def _token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, post: Any) -> Tensor:
    """``[n, H]`` hidden states and ``[n]`` targets -> ``[n]`` log-probs, in fp32."""
    logits = post(head(hidden).float())
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the output layer's matmul runs in: autocast's if active, else the inputs'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


#: ``linear(x [M, in], weight [out, in], bias [out] | None) -> [M, out]``: how a layer runs its fp32
#: products on the CPU. A layer class may name one as its ``fp32_linear`` attribute (the hardware
#: leaves do: ``preftune/hardware/cpu_linear.py``); the chunked head then uses it for its logits and dh.
LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _logits_into(out: Tensor, h: Tensor, w: Tensor, b: Tensor | None, linear: LinearFn | None) -> Tensor:
    """``out[:] = h w^T + b`` in fp32 (``out`` is fp32; the matmul runs in ``w``'s dtype; by ``linear``
    when given and that dtype is fp32)."""
    if linear is not None and w.dtype == out.dtype:
        return out.copy_(linear(h, w, b))
    if w.dtype == out.dtype:
        torch.mm(h, w.t(), out=out)
        return out if b is None else out.add_(b)
    return out.copy_(nn.functional.linear(h, w, b))


class HeadLogps(torch.autograd.Function):
    """``log softmax(h W^T + b)[target]`` per row, chunked, saving only ``logsumexp``.

    Shapes: hidden ``[n, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[n]`` -> ``[n]`` fp32.
    Rows go through one ``[chunk_size, V]`` fp32 buffer, reused for every chunk. Backward, with
    ``g`` the incoming ``[n]`` gradient and ``p = softmax(logits)``: the logits are recomputed into
    the buffer and turned in place into ``dlogits = g * (onehot(target) - p)``; then
    ``dh = dlogits W``, ``dW += dlogits^T h`` (accumulated in place in fp32), ``db += sum dlogits``.
    With ``keep_probs`` (pass it only in grad mode), the forward writes each chunk's ``p`` into one
    ``[n, V]`` fp32 tensor instead and the backward starts from it: one matmul fewer per chunk.
    Under autocast the matmuls run in autocast's dtype, as autograd would run them. ``linear``
    (:data:`LinearFn`, e.g. the head's ``fp32_linear``) runs the fp32 CPU products of the logits and
    ``dh``; None: PyTorch's.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_size: int, keep_probs: bool = False, linear: LinearFn | None = None) -> Tensor:
        dtype = _matmul_dtype(hidden, weight)
        linear = linear if dtype == torch.float32 and hidden.device.type == "cpu" else None
        n, vocab = hidden.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        keep = keep_probs and any(ctx.needs_input_grad[:3])  # the caller passes False without grad mode
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
            buffer = torch.empty(n if keep else min(chunk_size, n), vocab, dtype=torch.float32,
                                 device=hidden.device)
            for start in range(0, n, chunk_size):
                h, t = hidden[start : start + chunk_size].to(dtype), targets[start : start + chunk_size]
                rows = slice(start, start + h.shape[0])
                logits = _logits_into(buffer[rows] if keep else buffer[: h.shape[0]], h, w, b, linear)
                picked = logits.gather(1, t[:, None]).squeeze(1)
                peak = logits.max(1).values
                if keep:  # p = exp(logits - lse), as the backward would recompute it: the same bits
                    lse[rows] = peak + (logits - peak[:, None]).exp_().sum(1).log()
                    logits.sub_(lse[rows, None]).exp_()
                else:  # in place: the logits are done
                    lse[rows] = peak + logits.sub_(peak[:, None]).exp_().sum(1).log()
                out[rows] = picked - lse[rows]
        ctx.dtype, ctx.chunk_size, ctx.linear = dtype, chunk_size, linear
        ctx.save_for_backward(hidden, weight, bias, targets, lse, buffer if keep else None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, targets, lse, probs = ctx.saved_tensors
        dtype, chunk_size, linear, n = ctx.dtype, ctx.chunk_size, ctx.linear, hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                     if bias is not None and ctx.needs_input_grad[2] else None)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
            buffer = torch.empty(min(chunk_size, n), weight.shape[0], dtype=torch.float32,
                                 device=hidden.device)
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                h, t, g = hidden[rows].to(dtype), targets[rows, None], grad[rows, None]
                if probs is None:
                    dlogits = _logits_into(buffer[: h.shape[0]], h, w, b, linear)
                    dlogits.sub_(lse[rows, None]).exp_().mul_(-g)  # -g * p
                else:  # into the buffer: the kept p stays intact (a second backward reads it again)
                    dlogits = torch.mul(probs[rows], -g, out=buffer[: h.shape[0]])
                dlogits.scatter_add_(1, t, g)  # + g * onehot
                d = dlogits if dtype == torch.float32 else dlogits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = linear(d, w.t(), None) if linear is not None else d @ w
                if grad_weight is not None:
                    if dtype == torch.float32:
                        grad_weight.addmm_(d.t(), h)
                    else:
                        grad_weight += (d.t() @ h).float()
                if grad_bias is not None:
                    grad_bias += dlogits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


class SequenceScorer(nn.Module):
    """Wraps a Hugging Face causal LM; ``forward(batch) -> SequenceLogps``.

    The wrapper is what ``accelerate`` prepares (DDP/FSDP see one module whose forward is the
    whole computation). ``model`` may be a PEFT model. Output-layer post-processing that some
    architectures apply to logits (``final_logit_softcapping``, ``logit_scale``,
    ``logits_scaling``) is reproduced so the chunked head equals the model's own logits.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 256, unpadded: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.unpadded = unpadded
        config = model.config
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._scale = getattr(config, "logit_scale", None)
        self._divide = getattr(config, "logits_scaling", None)
        self._plain_head = self._scale is None and self._divide is None and self._softcap is None

    def _post(self, logits: Tensor) -> Tensor:
        if self._scale is not None:
            logits = logits * self._scale
        if self._divide is not None:
            logits = logits / self._divide
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _attention_mask(self, batch: ForwardBatch, dtype: torch.dtype,
                        decoder: nn.Module) -> Tensor | dict[str, Tensor]:
        images = batch.image_index if batch.pixel_inputs is not None else None
        return self.decoder_mask(batch.attention_mask, images, batch.position_ids, dtype, decoder)

    def decoder_mask(self, mask: Tensor, image_index: Tensor | None, positions: Tensor, dtype: torch.dtype,
                     decoder: nn.Module) -> Tensor | dict[str, Tensor]:
        """The decoder's mask for ``mask`` (``[R, T]`` padding or ``[R, 1, T, T]``); for a model whose image
        tokens see their whole image (Gemma 3) and a batch with images (``image_index``: the flat positions
        of its image tokens), one ``[R, 1, T, T]`` mask per layer type with those blocks open."""
        if image_index is not None and self.model.config.model_type in BIDIRECTIONAL_IMAGES:
            if mask.dim() == 2:  # padded rows: causal over the real tokens; a padding query sees itself
                width = mask.shape[1]
                causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
                eye = torch.eye(width, dtype=torch.bool, device=mask.device)
                mask = ((causal & mask.bool()[:, None, :]) | eye)[:, None]
            window = sliding_window(decoder)
            masks = image_attention_masks(mask, image_index, positions, window)
            return {kind: self._additive(m, dtype) for kind, m in masks.items()}
        return self._additive(mask, dtype)

    def _additive(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        if mask.dim() == 4 and self.model.config._attn_implementation == "eager":
            # eager attention adds the mask to the scores: True -> 0, False -> most negative
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        return mask

    def _unpadded(self, batch: ForwardBatch, decoder: nn.Module) -> Unpadded | None:
        """The batch as one stream of its real tokens, where the model's attention allows it."""
        if batch.segments is None or not self.unpadded or not supports_segments(decoder):
            return None
        return unpad(batch.input_ids, batch.position_ids, batch.segments, sliding_window(decoder))

    def scored_hidden(self, batch: ForwardBatch) -> Tensor:
        """``[N, H]`` decoder outputs at the scored positions (each predicts its ``score_target``).

        Packed and prefix-shared batches run unpadded (``model/attention.py``) when the model
        supports it: ``[1, real tokens]`` instead of ``[R, T]``, attention per segment.
        """
        decoder = self.model.get_decoder()
        stream = self._unpadded(batch, decoder)
        input_ids, score_index, image_index = batch.input_ids, batch.score_index, batch.image_index
        if stream is None:
            dtype = next(self.model.parameters()).dtype
            extra = {"attention_mask": self._attention_mask(batch, dtype, decoder),
                     "position_ids": batch.position_ids}
        else:
            input_ids, n = stream.input_ids, stream.input_ids.shape[1]
            score_index = stream.flat_to_stream[score_index]
            image_index = stream.flat_to_stream[image_index] if image_index is not None else None
            # a 4-D mask is passed through untouched; segment_sdpa ignores it for the plan
            mask = torch.ones((), dtype=torch.bool, device=input_ids.device).expand(1, 1, n, n)
            extra = {"attention_mask": mask, "position_ids": stream.position_ids, PLAN_KEY: stream.plan}
        if batch.pixel_inputs is not None:  # images: their features at the image tokens (model/vision.py)
            inputs = image_text_inputs(self.model, input_ids, batch.pixel_inputs, image_index,
                                       batch.image_feature)
        else:
            inputs = {"input_ids": input_ids}
        hidden = decoder(**inputs, **extra, use_cache=False).last_hidden_state
        if stream is not None and stream.plan.calls == 0:
            raise RuntimeError(f"{type(decoder).__name__} did not pass the segment plan to its attention; "
                               "run it with layout padded")
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)

    def token_logps(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """``[N, H]`` hidden states, ``[N]`` targets -> ``[N]`` fp32 log pi(target | context)."""
        head = self.model.get_output_embeddings()
        if self._plain_head and isinstance(head, nn.Linear):
            keep = keeps_head_probs(self.model) and torch.is_grad_enabled()  # apply's forward runs without
            return HeadLogps.apply(hidden, head.weight, head.bias, targets, self.chunk_size, keep,
                                   getattr(head, "fp32_linear", None))
        # logit post-processing or a wrapped head (e.g. LoRA on lm_head): generic, per chunk
        pieces = []
        for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size)):
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_token_logps, head, h, t, self._post, use_reentrant=False))
            else:
                pieces.append(_token_logps(head, h, t, self._post))
        return torch.cat(pieces)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[n, H]`` -> ``[n, V]`` fp32 logits as the model computes them (post-processing included)."""
        return self._post(self.model.get_output_embeddings()(hidden).float())

    def forward(self, batch: ForwardBatch) -> SequenceLogps:
        # labelled for torch.profiler (benchmarks/bench_dpo.py profile): the decoder, then the output layer
        with record_function("preftune: decoder"):
            hidden = self.scored_hidden(batch)
        with record_function("preftune: output layer"):
            token_logps = self.token_logps(hidden, batch.score_target)
        return sum_by_sequence(token_logps, batch.score_sequence, 2 * batch.num_pairs)


def sum_by_sequence(token_logps: Tensor, sequence: Tensor, num_sequences: int) -> SequenceLogps:
    """Scatter-sum ``[N]`` token log-probs into ``[S]`` sequences; split into chosen/rejected."""
    sums = token_logps.new_zeros(num_sequences).index_add(0, sequence, token_logps)
    counts = torch.bincount(sequence, minlength=num_sequences).to(token_logps.dtype)
    b = num_sequences // 2
    # whole tensors, not views of ``sums``: a sharded (FSDP2) module's outputs get backward hooks, which an
    # in-place op on a view would drop (torch warns on every view output)
    return SequenceLogps(*(t.clone() for t in (sums[:b], sums[b:], counts[:b], counts[b:])))

