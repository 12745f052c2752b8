"""Per-sequence log-probs from one forward pass.

    log pi(y | x) = sum_{t in completion(y)} log softmax(W h_{t-1})[y_t]

The decoder runs once over the whole :class:`ForwardBatch` (chosen and rejected together, in any
layout). The output layer is applied only at the ``N`` scored positions, in chunks of
``chunk_size`` rows, and each chunk keeps only ``logit[target] - logsumexp(logits)``: the
``[N, vocab]`` logits never exist at once, and with gradients on each chunk is recomputed in the
backward pass (activation checkpointing) so they are not kept alive either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from preftune.data.batching import ForwardBatch
from preftune.losses.base import SequenceLogps


def _token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, post: Any) -> Tensor:
    """``[n, H]`` hidden states and ``[n]`` targets -> ``[n]`` log-probs, in fp32."""
    logits = post(head(hidden).float())
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class SequenceScorer(nn.Module):
    """Wraps a Hugging Face causal LM; ``forward(batch) -> SequenceLogps``.

    The wrapper is what ``accelerate`` prepares (DDP/FSDP see one module whose forward is the
    whole computation). ``model`` may be a PEFT model. Output-layer post-processing that some
    architectures apply to logits (``final_logit_softcapping``, ``logit_scale``,
    ``logits_scaling``) is reproduced so the chunked head equals the model's own logits.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        config = model.config
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._scale = getattr(config, "logit_scale", None)
        self._divide = getattr(config, "logits_scaling", None)

    def _post(self, logits: Tensor) -> Tensor:
        if self._scale is not None:
            logits = logits * self._scale
        if self._divide is not None:
            logits = logits / self._divide
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _attention_mask(self, batch: ForwardBatch, dtype: torch.dtype) -> Tensor:
        mask = batch.attention_mask
        if mask.dim() == 4 and self.model.config._attn_implementation == "eager":
            # eager attention adds the mask to the scores: True -> 0, False -> most negative
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        return mask

    def forward(self, batch: ForwardBatch) -> SequenceLogps:
        decoder = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        hidden = decoder(
            input_ids=batch.input_ids,
            attention_mask=self._attention_mask(batch, next(self.model.parameters()).dtype),
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
        pieces = []
        for h, t in zip(hidden.split(self.chunk_size), batch.score_target.split(self.chunk_size)):
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_token_logps, head, h, t, self._post, use_reentrant=False))
            else:
                pieces.append(_token_logps(head, h, t, self._post))
        token_logps = torch.cat(pieces)
        return sum_by_sequence(token_logps, batch.score_sequence, 2 * batch.num_pairs)


def sum_by_sequence(token_logps: Tensor, sequence: Tensor, num_sequences: int) -> SequenceLogps:
    """Scatter-sum ``[N]`` token log-probs into ``[S]`` sequences; split into chosen/rejected."""
    sums = token_logps.new_zeros(num_sequences).index_add(0, sequence, token_logps)
    counts = torch.bincount(sequence, minlength=num_sequences).to(token_logps.dtype)
    b = num_sequences // 2
    return SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:])

