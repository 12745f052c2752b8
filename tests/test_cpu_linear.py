"""``cpu_linear: onednn`` (hardware/cpu_linear.py): oneDNN's products give nn.Linear's numbers, in every
checkpointing mode and layout; selective checkpointing keeps them; the setting resolves in one line."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (
    all_lengths_differ,
    assert_losses_close,
    assert_same_logps_and_grads,
    base_config,
    plain_weighted_backward,
    random_pairs,
    tiny_llama,
)
from preftune.data.batching import collate
from preftune.hardware import cpu_linear
from preftune.hardware.cpu_linear import OneDNNLinear, onednn_available, use_onednn
from preftune.model.checkpointing import MODES, enable_checkpointing
from preftune.model.logps import SequenceScorer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")]
BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2),
           "all_differ": all_lengths_differ()}
LINEAR_OP = "_linear_pointwise"


def _pair(bias: bool, seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    plain = nn.Linear(48, 80, bias=bias)
    fast = nn.Linear(48, 80, bias=bias)
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = OneDNNLinear
    return plain, fast


INPUTS = {
    "2d": lambda: torch.randn(9, 48),
    "3d": lambda: torch.randn(2, 7, 48),
    "transposed": lambda: torch.randn(48, 9).t(),
    "strided": lambda: torch.randn(9, 96)[:, ::2],
    "empty": lambda: torch.randn(0, 48),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", list(INPUTS))
def test_onednn_linear_gives_nn_linears_output_and_gradients(shape, bias):
    plain, fast = _pair(bias)
    x = INPUTS[shape]()
    x_plain, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_fast = plain(x_plain), fast(x_fast)
    grad = torch.randn_like(y_plain).transpose(0, -1).contiguous().transpose(0, -1)  # a non-contiguous dy
    want = torch.autograd.grad(y_plain, (x_plain, *plain.parameters()), grad)
    got = torch.autograd.grad(y_fast, (x_fast, *fast.parameters()), grad)
    # sums of 48 (forward), 80 (dx) and 9-18 (dW) fp32 products of size ~1: at most ~50 eps = 6e-6
    # apart, typically a few eps (or 0: the same kernel); a wrong transpose or stride is off by O(1)
    torch.testing.assert_close(y_fast, y_plain, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_frozen_weights_get_no_gradient_and_other_dtypes_take_torchs_path():
    plain, fast = _pair(bias=True)
    fast.requires_grad_(False)
    x = torch.randn(5, 48, requires_grad=True)
    (grad_x,) = torch.autograd.grad(fast(x).sum(), x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(plain(x).sum(), x)[0], atol=1e-5, rtol=1e-5)
    assert fast.weight.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16
    assert fast.to(torch.float64)(x.double()).dtype == torch.float64


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("mode", MODES)
def test_onednn_model_gives_the_plain_padded_logps_and_gradients(mode, layout, name):
    pairs = BATCHES[name]
    weights, expected, expected_grads = plain_weighted_backward(pairs)
    model = tiny_llama().train()
    enable_checkpointing(model, mode)
    layers = model.config.num_hidden_layers
    assert use_onednn(model) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, and the output layer
    assert os.environ.get("LRU_CACHE_CAPACITY")  # ideep's per-shape cache bounded (or as the user set it)
    assert list(model.state_dict()) == list(tiny_llama().state_dict())  # checkpoints unchanged
    got = SequenceScorer(model, chunk_size=5)(collate(pairs, layout=layout))
    (torch.cat([got.chosen, got.rejected]) * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_same_logps_and_grads(got, grads, expected, expected_grads)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__ == LINEAR_OP
        return func(*args, **(kwargs or {}))


def _backward_linear_calls(mode: str) -> int:
    pairs = BATCHES["mixed"]
    model = tiny_llama().train()
    enable_checkpointing(model, mode)
    use_onednn(model)
    out = SequenceScorer(model, chunk_size=5)(collate(pairs))
    with OpCounter() as counter:
        (torch.cat([out.chosen, out.rejected]) * torch.linspace(-1, 1, 2 * len(pairs))).sum().backward()
    return counter.calls


def test_the_output_layers_chunks_run_through_onednn_too():
    """Forward: the 7 products of each layer and one logits product per chunk of 5 scored positions."""
    pairs = BATCHES["mixed"]
    model = tiny_llama().train()
    use_onednn(model)
    batch = collate(pairs)
    chunks = -(-batch.score_index.numel() // 5)
    with OpCounter() as counter:
        SequenceScorer(model, chunk_size=5)(batch)
    assert chunks > 1 and counter.calls == 7 * model.config.num_hidden_layers + chunks


def test_selective_checkpointing_keeps_the_onednn_products():
    """In backward each layer's 7 products run once more for their input gradients (and the output
    layer's logits and ``dh`` per chunk); ``full`` also replays q, k, v, o, gate, up; ``selective``
    saved them, as it saves torch's matmuls."""
    layers = tiny_llama().config.num_hidden_layers
    chunks = -(-collate(BATCHES["mixed"]).score_index.numel() // 5)
    off, selective, full = (_backward_linear_calls(mode) for mode in ("off", "selective", "full"))
    assert off == 7 * layers + 2 * chunks
    assert selective == off
    assert full >= off + 6 * layers


@pytest.mark.usefixtures("own_cpu_linear_auto")
def test_resolve_picks_onednn_on_an_x86_cpu_and_refuses_what_cannot_apply(monkeypatch):
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    assert cpu_linear.resolve("auto", "cpu")[0] == "onednn"
    assert cpu_linear.resolve("auto", "cuda") == ("torch", "training on cuda")
    assert cpu_linear.resolve("torch", "cpu") == ("torch", "as configured")
    assert cpu_linear.resolve("onednn", "cpu") == ("onednn", "as configured")
    with pytest.raises(ValueError, match="^config: cpu_linear: onednn runs linear layers on the CPU, but "
                                         "training runs on cuda; use auto or torch$"):
        cpu_linear.resolve("onednn", "cuda")
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "arm64")
    assert cpu_linear.resolve("auto", "cpu") == ("torch", "not an x86 CPU (arm64)")
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="needs a PyTorch built with oneDNN"):
        cpu_linear.resolve("onednn", "cpu")
    model = tiny_llama()
    assert cpu_linear.configure(model, "torch", "cpu") == "cpu_linear: torch (as configured)"
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


def _losses(run_dir) -> list[float]:
    rows = (run_dir / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows if '"loss"' in r]


@pytest.mark.usefixtures("own_cpu_linear_auto")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_with_onednn_states_it_and_matches_torchs_losses(tmp_path, caplog, monkeypatch, lora):
    from preftune.hardware import process_owned
    from preftune.methods.dpo import train_dpo

    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    losses, lines = {}, {}
    for setting in ("auto", "torch"):
        run = tmp_path / setting
        run.mkdir()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="preftune"), process_owned():  # auto: as under the CLI
            train_dpo(base_config(run, max_steps=3, batch_size=4, cpu_linear=setting, lora=lora,
                                  save_final=False))
        losses[setting] = _losses(run)
        lines[setting] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cpu_linear:")]
    assert len(losses["auto"]) == 3
    assert_losses_close(losses["auto"], losses["torch"])  # other kernels, the same arithmetic
    assert lines["torch"] == ["cpu_linear: torch (as configured)"]
    assert len(lines["auto"]) == 1 and lines["auto"][0].startswith("cpu_linear: onednn (15 linear layers; ")


def test_a_bad_cpu_linear_is_one_line_naming_the_choices(tmp_path, capsys):
    from preftune.cli import main

    (tmp_path / "d.jsonl").write_text("")
    assert main(["dpo", "--train_file", str(tmp_path / "d.jsonl"), "--cpu_linear", "mkl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune dpo: error: config: cpu_linear ") and \
        "auto, onednn, torch" in err[0], err
