"""Every layout and the chunked output layer give the plain padded forward's log-probs."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    all_lengths_differ,
    assert_grads_close,
    assert_logps_close,
    plain_logps,
    random_pairs,
    tiny_llama,
)
from preftune.data.batching import collate
from preftune.data.tokenize import TokenizedPair
from preftune.hardware.cpu_linear import onednn_linear
from preftune.model.checkpointing import enable_checkpointing
from preftune.model.logps import HeadLogps, SequenceScorer

LAYOUTS = [("padded", None), ("packed", None), ("packed", 48), ("prefix_shared", None), ("prefix_shared", 60)]


BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2),
           "all_differ": all_lengths_differ()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout,pack_length", LAYOUTS)
@pytest.mark.parametrize("name", list(BATCHES))
def test_layouts_match_plain_forward(attn, layout, pack_length, name):
    model = tiny_llama(attn=attn)
    pairs = BATCHES[name]
    expected = plain_logps(model, collate(pairs, layout="padded"))
    got = SequenceScorer(model, chunk_size=5)(collate(pairs, layout=layout, pack_length=pack_length))
    assert_logps_close(got, expected)
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
    got = grads(lambda m: SequenceScorer(m, chunk_size=4)(collate(pairs, layout=layout,
                                                                  pack_length=pack_length)))
    assert_grads_close(got, expected)


def test_packing_puts_several_sequences_in_a_row():
    pairs = random_pairs(6, seed=4, max_len=5)
    packed = collate(pairs, layout="packed", pack_length=64)
    shared = collate(pairs, layout="prefix_shared", pack_length=64)
    assert packed.input_ids.shape[0] < 12 and shared.input_ids.shape[0] < 6
    padded = collate(pairs, layout="padded")
    assert shared.input_ids.numel() < padded.input_ids.numel()


@pytest.mark.parametrize("onednn", [False, True], ids=["torch", "onednn"])
@pytest.mark.parametrize("keep_probs", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_logps_function_matches_autograd(bias, dtype, keep_probs, onednn):
    """The in-place backward of HeadLogps equals autograd through linear -> log_softmax -> gather,
    also under autocast (matmuls in bf16), with a bias, from kept probabilities, and with the fp32
    products by oneDNN (cpu_linear: onednn; under autocast they stay autocast's)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    upstream = torch.randn(7)

    def run(fn):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = fn()
        (out * upstream).sum().backward()
        return [out.detach(), hidden.grad] + [p.grad for p in head.parameters()]

    def plain():
        logits = head(hidden).float()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    expected = run(plain)
    linear = onednn_linear if onednn else None  # the layer's fp32_linear: oneDNN's, or PyTorch's products
    # chunks 3, 3, 1
    got = run(lambda: HeadLogps.apply(hidden, head.weight, head.bias, targets, 3, keep_probs, linear))
    # the same 16-term products and 50-term softmax sums, in chunks and by other kernels: fp32 values
    # and gradients of size ~1 agree to ~1e-6; bf16 matmuls (8-bit mantissa, eps 7.8e-3) to ~1e-2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)


def test_kept_probabilities_survive_a_second_backward_and_only_grad_mode_keeps_them():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    out = HeadLogps.apply(hidden, head.weight, head.bias, targets, 3, True)
    assert any(t is not None and t.shape == (7, 50) for t in out.grad_fn.saved_tensors)
    first = torch.autograd.grad(out.sum(), [hidden, head.weight], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [hidden, head.weight])
    recomputed = HeadLogps.apply(hidden, head.weight, head.bias, targets, 3, False)
    assert not any(t is not None and t.shape == (7, 50) for t in recomputed.grad_fn.saved_tensors)
    third = torch.autograd.grad(recomputed.sum(), [hidden, head.weight])
    # kept or recomputed: bitwise, as the forward writes p = exp(logits - lse) with the very ops the
    # backward would recompute it with, on the same inputs (and a second backward reads the same p)
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    torch.testing.assert_close(out, recomputed, atol=0, rtol=0)
    # the scorer keeps them only in grad mode (a reference pass holds no [N, vocab] tensor)
    model = tiny_llama().train()
    enable_checkpointing(model, "off", keep_head_probs=True)
    scorer, batch = SequenceScorer(model, chunk_size=5), collate(random_pairs(2, seed=6))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        with torch.no_grad():
            plain = scorer(batch)
        assert kept == []
        graded = scorer(batch)
    assert (int(batch.score_index.numel()), 64) in kept
    # bitwise: the same forward kernels on the same inputs; keeping p changes only what is saved
    torch.testing.assert_close(graded.chosen.detach(), plain.chosen, atol=0, rtol=0)


def test_logit_softcapping_uses_the_generic_path():
    """A model whose logits are post-processed (softcapping) still matches its own full logits."""
    model = tiny_llama()
    model.config.final_logit_softcapping = 3.0
    pairs = random_pairs(3, seed=5)
    batch = collate(pairs, layout="padded")
    scorer = SequenceScorer(model, chunk_size=4)
    assert not scorer._plain_head
    got = scorer(batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = torch.tanh(logits / 3.0) * 3.0
    token = logits.log_softmax(-1).reshape(-1, logits.shape[-1])[batch.score_index]
    token = token.gather(-1, batch.score_target[:, None]).squeeze(-1)
    sums = torch.zeros(6).index_add(0, batch.score_sequence, token)
    assert_logps_close(got.chosen, sums[:3])


def test_default_packing_fills_rows_up_to_the_longest_segment():
    """pack_length None: short pairs share rows, the batch is never wider than its longest pair."""
    long_pair = TokenizedPair(tuple(range(3, 43)), (5, 6, 7), (8, 9))  # 45 tokens
    short = [TokenizedPair((3, 4), (5, 6), (7,)) for _ in range(6)]  # 5 tokens each
    batch = collate([long_pair, *short], layout="prefix_shared")
    assert batch.input_ids.shape == (2, 45)  # the long pair alone, the six short ones together (not 7 rows)
    model = tiny_llama()
    expected = plain_logps(model, collate([long_pair, *short], layout="padded"))
    got = SequenceScorer(model, chunk_size=7)(batch)
    assert_logps_close(got, expected)


@pytest.mark.parametrize("name", list(BATCHES))
def test_gradient_checkpointing_gives_the_same_logps_and_gradients(name):
    """Activation checkpointing (chosen by default from the memory budget) recomputes the decoder in
    backward: same numbers."""
    from preftune.engine.config import TrainConfig

    pairs = BATCHES[name]
    weights = torch.linspace(-1, 1, 2 * len(pairs))

    def run(checkpointing: bool):
        model = tiny_llama().train()
        if checkpointing:  # as preftune.engine.setup.load_policy turns it on (transformers >= 5 name)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_activation_checkpointing == checkpointing
        out = SequenceScorer(model, chunk_size=5)(collate(pairs))
        (torch.cat([out.chosen, out.rejected]) * weights).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    assert TrainConfig.__dataclass_fields__["gradient_checkpointing"].default == "auto"
    expected = plain_logps(tiny_llama(), collate(pairs, layout="padded"))
    (plain, plain_grads), (ckpt, ckpt_grads) = run(False), run(True)
    for out in (plain, ckpt):
        assert_logps_close(out, expected)
    # the recomputed forward runs the same kernels (seen bit-identical here), but the claim is equal
    # arithmetic, not equal bits (a recompute may take another kernel): helpers.GRAD_RTOL
    assert_grads_close(ckpt_grads, plain_grads)


@pytest.mark.parametrize("name", list(BATCHES))
def test_precomputed_reference_equals_the_plain_forward(name, tmp_path):
    """Reference log-probs precomputed by the starting policy (in other batches than training's),
    read back by dataset position, equal the plain padded forward's."""
    from preftune.model.reference import InitialPolicyReference, precompute_reference

    model = tiny_llama().train()
    pairs = BATCHES[name]
    halves = [range(0, len(pairs) // 2), range(len(pairs) // 2, len(pairs))]
    batches = [collate([pairs[i] for i in idx], idx) for idx in halves if len(idx)]
    cache = precompute_reference(InitialPolicyReference(SequenceScorer(model, chunk_size=5)), batches,
                                 len(pairs), tmp_path, "key")
    assert model.training  # the policy goes back to training mode
    order = list(reversed(range(len(pairs))))
    got = cache(collate([pairs[i] for i in order], order))
    expected = plain_logps(model, collate([pairs[i] for i in order], layout="padded"))
    assert_logps_close(got, expected)
