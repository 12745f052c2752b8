"""Shared test helpers: tiny models, plain reference computations."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.data.batching import ForwardBatch
from preftune.data.tokenize import TokenizedPair
from preftune.losses.base import SequenceLogps
from preftune.model.logps import sum_by_sequence

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(vocab: int = 64, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def random_pairs(n: int, vocab: int = 64, seed: int = 0, max_len: int = 12) -> list[TokenizedPair]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len)))
        c = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len)))
        r = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len)))
        out.append(TokenizedPair(p, c, r, 1.0))
    return out


def plain_logps(model, batch: ForwardBatch) -> SequenceLogps:
    """The plain way: full logits of a padded batch, log-softmax, gather, sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    token_logps = logp[batch.score_index, batch.score_target]
    return sum_by_sequence(token_logps, batch.score_sequence, 2 * batch.num_pairs)
