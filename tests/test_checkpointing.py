"""Activation checkpointing modes (preftune.model.checkpointing): every mode gives the plain model's
log-probs and gradients in every layout; "selective" does not recompute matmuls or attention."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import all_lengths_differ, plain_logps, random_pairs, tiny_llama
from preftune.data.batching import collate
from preftune.model.checkpointing import MODES, checkpointing_mode, enable_checkpointing
from preftune.model.logps import SequenceScorer

pytestmark = pytest.mark.usefixtures("one_thread")


BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2), "all_differ": all_lengths_differ()}
LAYOUTS = ("padded", "packed", "prefix_shared")


def _weights(pairs) -> torch.Tensor:
    return torch.linspace(-1, 1, 2 * len(pairs))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def expected():
    """Per batch: the plain model's (no checkpointing, padded, full logits) log-probs and gradients."""
    out = {}
    for name, pairs in BATCHES.items():
        model = tiny_llama().train()
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        logps = plain_logps(model, collate(pairs, layout="padded"))
        (torch.cat([logps.chosen, logps.rejected]) * _weights(pairs)).sum().backward()
        out[name] = (logps, _grads(model))
    return out


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_modes_give_the_plain_logps_and_gradients(mode, layout, name, expected):
    pairs = BATCHES[name]
    model = tiny_llama().train()
    enable_checkpointing(model, mode)
    assert checkpointing_mode(model) == mode
    layers = model.model.layers
    assert all(layer.gradient_checkpointing == (mode != "off") for layer in layers)
    got = SequenceScorer(model, chunk_size=5)(collate(pairs, layout=layout))
    (torch.cat([got.chosen, got.rejected]) * _weights(pairs)).sum().backward()
    want, want_grads = expected[name]
    torch.testing.assert_close(got.chosen, want.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, want.rejected, atol=1e-5, rtol=0)
    grads = _grads(model)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-5, msg=n)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that actually run (selective checkpointing's cache answers its saved ops
    above this mode, so a cached op is not counted)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


FORWARD_ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math")


def _backward_ops(mode: str, attn: str) -> Counter[str]:
    pairs = BATCHES["mixed"]
    model = tiny_llama(attn=attn).train()
    enable_checkpointing(model, mode)
    out = SequenceScorer(model, chunk_size=5)(collate(pairs, layout="prefix_shared"))
    loss = (torch.cat([out.chosen, out.rejected]) * _weights(pairs)).sum()
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_selective_saves_matmul_and_attention_outputs(attn):
    """In backward, "full" replays each layer's projections (and attention) before its gradients;
    "selective" runs exactly the matmuls that no checkpointing runs (the gradients' own), no forward
    attention kernel, and still recomputes the elementwise ops (RMSNorm's rsqrt, SiLU)."""
    off, full, selective = (_backward_ops(mode, attn) for mode in ("off", "full", "selective"))
    layers = tiny_llama().config.num_hidden_layers
    matmuls = ("mm", "bmm", "addmm", "baddbmm")

    def n(counts, names):
        return sum(counts[k] for k in names)

    # full replays q, k, v, o, gate, up of every layer (down_proj's output is not needed: early stop)
    assert n(full, matmuls) >= n(off, matmuls) + 6 * layers
    assert n(selective, matmuls) == n(off, matmuls)
    if attn == "sdpa":
        assert n(full, FORWARD_ATTENTION) == layers
        assert n(selective, FORWARD_ATTENTION) == n(off, FORWARD_ATTENTION) == 0
    # the cheap ops are recomputed in both checkpointing modes, never without checkpointing
    for counts in (full, selective):
        assert counts["rsqrt"] == 2 * layers and counts["silu"] == layers
    assert off["rsqrt"] == off["silu"] == 0


def test_off_turns_checkpointing_off_and_bad_modes_are_refused():
    model = tiny_llama().train()
    enable_checkpointing(model, "selective")
    assert model.config.use_cache is False
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    enable_checkpointing(model, "off")
    assert checkpointing_mode(model) == "off"
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    with pytest.raises(ValueError, match="selective"):
        enable_checkpointing(model, "on")


def test_selective_model_scores_without_gradients():
    """Reference scoring (no grad, e.g. a precompute pass with the policy) runs the layers as is."""
    pairs = BATCHES["mixed"]
    model = tiny_llama().train()
    enable_checkpointing(model, "selective")
    with torch.no_grad():
        got = SequenceScorer(model, chunk_size=5)(collate(pairs))
    want = plain_logps(tiny_llama(), collate(pairs, layout="padded"))
    torch.testing.assert_close(got.chosen, want.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, want.rejected, atol=1e-5, rtol=0)
