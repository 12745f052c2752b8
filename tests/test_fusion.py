"""``compile: true`` (model/fusion.py): compiled norms and MLPs give the plain forward's numbers."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (
    all_lengths_differ,
    assert_losses_close,
    assert_same_logps_and_grads,
    base_config,
    plain_weighted_backward,
    random_pairs,
    tiny_llama,
    write_pairs,
)
from preftune.data.batching import collate
from preftune.methods.dpo import train_dpo
from preftune.model.checkpointing import enable_checkpointing
from preftune.model.fusion import compile_layers, compiler_missing
from preftune.model.logps import SequenceScorer

pytestmark = pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None,
                                reason="torch.compile on CPU needs a C++ compiler")
BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2),
           "all_differ": all_lengths_differ()}


@pytest.mark.parametrize("mode", ["off", "full"])
@pytest.mark.parametrize("name", list(BATCHES))
def test_compiled_layers_equal_the_plain_padded_forward(name, mode):
    pairs = BATCHES[name]
    weights, expected, expected_grads = plain_weighted_backward(pairs)
    model = tiny_llama().train()
    enable_checkpointing(model, mode)
    assert compile_layers(model) == 3 * model.config.num_hidden_layers  # two norms and the MLP per layer
    torch._dynamo.reset()
    got = SequenceScorer(model, chunk_size=5)(collate(pairs))
    (torch.cat([got.chosen, got.rejected]) * weights).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the norms' and the MLP's graphs ran
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_same_logps_and_grads(got, grads, expected, expected_grads)
    assert "_orig_mod" not in "".join(model.state_dict())  # compiled in place: checkpoints unchanged


def test_compile_trains_like_the_uncompiled_run(tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", n=16)
    runs = {}
    for flag in (False, True):
        (tmp_path / str(flag)).mkdir()
        config = base_config(tmp_path / str(flag), train_file=str(data), max_steps=3, batch_size=4,
                             compile=flag, gradient_checkpointing="off", save_final=False)
        train_dpo(config)
        rows = (tmp_path / str(flag) / "out" / "metrics.jsonl").read_text().splitlines()
        runs[flag] = [json.loads(r)["loss"] for r in rows if '"loss"' in r]
    assert len(runs[True]) == 3
    assert_losses_close(runs[True], runs[False])  # inductor's fused kernels round differently


def test_compile_with_selective_checkpointing_is_a_config_error(tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", n=8)
    with pytest.raises(ValueError,
                       match="compile: true does not combine with gradient_checkpointing: selective"):
        train_dpo(base_config(tmp_path, train_file=str(data), compile=True,
                              gradient_checkpointing="selective"))


def test_a_missing_cpu_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "C++ compiler" in compiler_missing(torch.device("cpu"))
    assert compiler_missing(torch.device("cuda")) is None
