"""The unpadded forward (model/attention.py) equals the plain padded forward, and is used only where
the model's attention supports it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from helpers import (
    all_lengths_differ,
    assert_logps_close,
    assert_same_logps_and_grads,
    plain_logps,
    plain_weighted_backward,
    random_pairs,
    tiny_llama,
)
from preftune.data.batching import collate
from preftune.model import attention
from preftune.model.attention import SUPPORTED_MODEL_TYPES, segment_plan, segment_sdpa, unpad
from preftune.model.checkpointing import enable_checkpointing
from preftune.model.logps import SequenceScorer

BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2),
           "all_differ": all_lengths_differ()}
LAYOUTS = [("packed", None), ("packed", 48), ("prefix_shared", None), ("prefix_shared", 60)]


def _scored(model, batch, unpadded=True, weights=None):
    """Per-sequence log-probs, parameter gradients, and how many attention layers ran unpadded."""
    scorer = SequenceScorer(model, chunk_size=5, unpadded=unpadded)
    stream = scorer._unpadded(batch, model.get_decoder())
    out = scorer(batch)
    if weights is not None:
        (torch.cat([out.chosen, out.rejected]) * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, stream


@pytest.mark.parametrize("mode", ["off", "full", "selective"])
@pytest.mark.parametrize("layout,pack_length", LAYOUTS)
@pytest.mark.parametrize("name", list(BATCHES))
def test_unpadded_forward_equals_the_plain_padded_forward(name, layout, pack_length, mode):
    pairs = BATCHES[name]
    weights, expected, expected_grads = plain_weighted_backward(pairs)
    model = tiny_llama().train()
    enable_checkpointing(model, mode)
    batch = collate(pairs, layout=layout, pack_length=pack_length)
    got, grads, stream = _scored(model, batch, weights=weights)
    assert stream is not None and stream.input_ids.shape == (1, batch.num_real_tokens)
    assert batch.num_real_tokens < batch.input_ids.numel() or name == "one"
    assert_same_logps_and_grads(got, grads, expected, expected_grads)


@pytest.mark.parametrize("block", [1, 2, 3])
@pytest.mark.parametrize("mode", ["off", "full"])
@pytest.mark.parametrize("name", list(BATCHES))
def test_rejected_queries_in_blocks_equal_the_plain_padded_forward(name, mode, block, monkeypatch):
    monkeypatch.setattr(attention, "REJECTED_BLOCK", block)  # blocks much shorter than the rejected parts
    pairs = BATCHES[name]
    weights, expected, expected_grads = plain_weighted_backward(pairs)
    model = tiny_llama().train()
    enable_checkpointing(model, mode)
    batch = collate(pairs, layout="prefix_shared")
    got, grads, stream = _scored(model, batch, weights=weights)
    assert stream.plan.block == block
    assert max(r for _, _, r in stream.plan.sizes) > 2 * block or name == "one"
    assert_same_logps_and_grads(got, grads, expected, expected_grads)


@pytest.mark.parametrize(("shared", "rejected", "block"), [(5, 17, 4), (0, 9, 2), (7, 3, 8), (4, 8, 8)])
def test_rejected_attention_blocks_equal_one_masked_call(shared, rejected, block):
    # float64: the blocks compute the very same softmax rows and only sum the k and v gradients in
    # another order, ~1e-16 apart; 1e-10 then checks the algorithm, not the kernels' rounding
    torch.manual_seed(0)
    q = torch.randn(1, 2, rejected, 4, requires_grad=True, dtype=torch.float64)
    k, v = (torch.randn(1, 2, shared + rejected, 4, requires_grad=True, dtype=torch.float64)
            for _ in range(2))
    mask = torch.ones(rejected, shared + rejected, dtype=torch.bool).tril(diagonal=shared)
    g = torch.randn(1, 2, rejected, 4, dtype=torch.float64)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = [whole, *torch.autograd.grad(whole, (q, k, v), g)]
    blocks = torch.cat(attention.rejected_attention(q, k, v, mask, block, 0.0, None), dim=2)
    got = [blocks, *torch.autograd.grad(blocks, (q, k, v), g)]
    for a, b in zip(got, expected):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)  # values and gradients of size ~1


def test_every_attention_layer_runs_the_plan_once_per_forward():
    model = tiny_llama()
    scorer = SequenceScorer(model)
    batch = collate(random_pairs(4, seed=5), layout="prefix_shared")
    stream = scorer._unpadded(batch, model.get_decoder())
    scorer._unpadded = lambda b, d: stream  # the scorer uses this very plan
    scorer(batch)
    assert stream.plan.calls == model.config.num_hidden_layers
    # 4 pairs: a causal call over prompt + chosen and a masked call for rejected each
    assert len(stream.plan.chunks) == 8 and sum(m is not None for m in stream.plan.masks) == 4


def test_the_rejected_part_sees_the_prompt_and_its_own_past_only():
    plan = segment_plan(torch.tensor([[3, 2, 2], [4, 0, 0]]), "cpu")
    assert plan.chunks == [5, 2, 4] and plan.num_tokens == 11
    assert plan.masks[0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert plan.masks[1] is None


def test_stream_positions_skip_the_padding_and_keep_row_order():
    batch = collate(random_pairs(5, seed=6), layout="packed", pack_length=30)
    stream = unpad(batch.input_ids, batch.position_ids, batch.segments)
    real = stream.flat_to_stream >= 0
    assert int(real.sum()) == batch.num_real_tokens == stream.input_ids.shape[1]
    assert stream.flat_to_stream[real].tolist() == list(range(batch.num_real_tokens))  # flat order kept
    torch.testing.assert_close(stream.input_ids[0], batch.input_ids.reshape(-1)[real])
    torch.testing.assert_close(stream.position_ids[0], batch.position_ids.reshape(-1)[real])


def test_padded_layout_and_eager_attention_keep_the_dense_forward():
    pairs = random_pairs(3, seed=7)
    padded = collate(pairs, layout="padded")
    assert padded.segments is None
    eager = tiny_llama(attn="eager")
    assert SequenceScorer(eager)._unpadded(collate(pairs), eager.get_decoder()) is None
    sdpa = tiny_llama()
    assert SequenceScorer(sdpa, unpadded=False)._unpadded(collate(pairs), sdpa.get_decoder()) is None


def _tiny(model_type, **extra):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False, **extra)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}
FAMILIES = {  # every model type the unpadded forward accepts, but llama (tested above)
    "mistral": {"sliding_window": None}, "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {}, "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 16, **MOE},
    "qwen3": {"head_dim": 8}, "qwen3_moe": {"num_experts": 4, "head_dim": 8, **MOE}, "gemma": {"head_dim": 8},
    "phi": {}, "phi3": {"sliding_window": None, "pad_token_id": 0}, "olmo2": {}, "granite": {},
    "smollm3": {"pad_token_id": 0}, "cohere": {},
}


def test_the_family_list_is_the_tested_one():
    # image-text models' decoders: tests/test_vision_families.py (their packed and prefix-shared layouts)
    assert {"llama", *FAMILIES, "qwen2_vl_text", "qwen2_5_vl_text",
                                    "qwen3_vl_text"} == SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_other_supported_families_equal_their_plain_forward(model_type):
    model = _tiny(model_type, **FAMILIES[model_type])
    pairs = BATCHES["mixed"]
    expected = plain_logps(model, collate(pairs, layout="padded"))
    got, _, stream = _scored(model, collate(pairs))
    assert stream is not None
    # fp32 sums of ~-45 nats (float64 would not help: the chunked head's log-probs are fp32 by design,
    # and the MoE families' grouped matmuls take no float64): relative, as helpers.LOGP_RTOL says
    assert_logps_close(got, expected)


def test_a_sliding_window_shorter_than_a_segment_keeps_the_dense_mask():
    pairs = random_pairs(4, seed=8, max_len=12)
    batch = collate(pairs)
    longest = int((batch.segments[:, 1] + batch.segments[:, 2:].amax(1)).max())
    short = _tiny("mistral", sliding_window=longest - 1)
    assert SequenceScorer(short)._unpadded(batch, short.get_decoder()) is None
    wide = _tiny("mistral", sliding_window=longest)
    assert SequenceScorer(wide)._unpadded(batch, wide.get_decoder()) is not None
    expected = plain_logps(short, collate(pairs, layout="padded"))
    assert_logps_close(SequenceScorer(short)(batch).chosen, expected.chosen)


def test_without_a_plan_the_attention_is_transformers_sdpa():
    """Generation and every other caller of the registered "sdpa" get transformers' function."""
    model = tiny_llama()
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g) for h in (4, 2, 2))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7).clone()
    mask[1, :, :, :2] = False
    for m in (None, mask):
        got, _ = segment_sdpa(module, q, k, v, m, scaling=0.3)
        want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # bitwise: the same function on the same inputs


def test_the_dense_mask_is_built_only_when_a_forward_needs_it():
    pairs = random_pairs(4, seed=9)
    batch = collate(pairs)
    model = tiny_llama()
    SequenceScorer(model)(batch)
    assert "attention_mask" not in batch.__dict__  # the unpadded forward never built it
    eager = tiny_llama(attn="eager")
    expected = plain_logps(eager, collate(pairs, layout="padded"))
    assert_logps_close(SequenceScorer(eager)(batch).chosen, expected.chosen)
    shape = batch.input_ids.shape
    assert batch.__dict__["attention_mask"].shape == (shape[0], 1, *shape[1:] * 2)
    moved = batch.to("cpu")  # the cached mask is not a field: it is built again where needed
    assert "attention_mask" not in moved.__dict__ and torch.equal(moved.attention_mask, batch.attention_mask)
