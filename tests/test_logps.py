"""Every layout and the chunked output layer give the plain padded forward's log-probs."""

from __future__ import annotations

import pytest
import torch

from helpers import plain_logps, random_pairs, tiny_llama
from preftune.data.batching import collate
from preftune.data.tokenize import TokenizedPair
from preftune.model.logps import SequenceScorer

LAYOUTS = [("padded", None), ("packed", None), ("packed", 48), ("prefix_shared", None), ("prefix_shared", 60)]


def all_lengths_differ() -> list[TokenizedPair]:
    """Every prompt, chosen and rejected length in the batch is different."""
    out, k = [], 3
    for i in range(4):
        p, c, r = 1 + 3 * i, 2 + 3 * i, 3 + 3 * i
        out.append(TokenizedPair(tuple(range(k, k + p)), tuple(range(5, 5 + c)), tuple(range(7, 7 + r))))
        k += 1
    return out


BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2), "all_differ": all_lengths_differ()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout,pack_length", LAYOUTS)
@pytest.mark.parametrize("name", list(BATCHES))
def test_layouts_match_plain_forward(attn, layout, pack_length, name):
    model = tiny_llama(attn=attn)
    pairs = BATCHES[name]
    expected = plain_logps(model, collate(pairs, layout="padded"))
    got = SequenceScorer(model, chunk_size=5)(collate(pairs, layout=layout, pack_length=pack_length))
    torch.testing.assert_close(got.chosen, expected.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, expected.rejected, atol=1e-5, rtol=0)
    assert got.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]
    assert got.rejected_tokens.tolist() == [len(p.rejected_ids) for p in pairs]


@pytest.mark.parametrize("layout,pack_length", LAYOUTS)
def test_gradients_match_plain_forward(layout, pack_length):
    pairs = random_pairs(5, seed=3)
    weights = torch.linspace(-1, 1, 10)

    def grads(fn):
        model = tiny_llama().train()
        out = fn(model)
        (torch.cat([out.chosen, out.rejected]) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = grads(lambda m: plain_logps(m, collate(pairs, layout="padded")))
    got = grads(lambda m: SequenceScorer(m, chunk_size=4)(collate(pairs, layout=layout, pack_length=pack_length)))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_puts_several_sequences_in_a_row():
    pairs = random_pairs(6, seed=4, max_len=5)
    packed = collate(pairs, layout="packed", pack_length=64)
    shared = collate(pairs, layout="prefix_shared", pack_length=64)
    assert packed.input_ids.shape[0] < 12 and shared.input_ids.shape[0] < 6
    padded = collate(pairs, layout="padded")
    assert shared.input_ids.numel() < padded.input_ids.numel()
