"""optimizer_in_backward: the same weights as the one optimizer, no full set of gradients, clear refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import base_config, crash_at
from preftune.engine.config import TrainConfig
from preftune.engine.optimizer import OptimizerInBackward, make_optimizer
from preftune.methods.dpo import train_dpo


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run.train.final_dir / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_same_weights_losses_and_grad_norms_as_one_optimizer(tmp_path, lora):
    settings = dict(max_steps=4, batch_size=4, max_grad_norm=0, lora=lora, lr_scheduler="cosine",
                    warmup_steps=1, weight_decay=0.1, gradient_checkpointing="full")
    plain = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "plain"), **settings))
    inline = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "inline"), optimizer_in_backward=True,
                                   **settings))
    a, b = weights(plain), weights(inline)
    # bit for bit: the same forward and backward kernels in this process, and the fused AdamW kernel
    # applied per tensor (inline) or over all tensors (plain) does the same per-element arithmetic
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(plain.train.history, inline.train.history, strict=True):
        assert p["loss"] == q["loss"] and p["lr"] == q["lr"]
        # the norm sums the squares per tensor as the hooks run, not all at once: another order of a
        # sum of positive fp32 terms, a few eps apart; 1e-5 (~84 eps) of it
        assert q["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-5)
    assert inline.train.history[-1]["loss"] < inline.train.history[0]["loss"] or lora


def test_resume_gives_the_same_weights(tmp_path):
    settings = dict(max_steps=4, batch_size=4, save_steps=2, max_grad_norm=0, optimizer_in_backward=True)
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))

    with pytest.raises(KeyboardInterrupt):
        train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), **settings),
                  callbacks=[crash_at(3)])
    resumed = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), resume=True, **settings))
    a, b = weights(whole), weights(resumed)
    # bitwise: the same process, kernels and batches, resumed or not
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.train.history[-1]["loss"] == whole.train.history[-1]["loss"]


def _model_and_optimizer() -> tuple[nn.Module, OptimizerInBackward]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    config = TrainConfig(train_file="x", optimizer_in_backward=True, max_grad_norm=None, learning_rate=0.1)
    optimizer = make_optimizer(config, list(model.parameters()))
    assert isinstance(optimizer, OptimizerInBackward)
    return model, optimizer


def test_each_gradient_is_freed_once_its_update_ran():
    model, optimizer = _model_and_optimizer()
    held = []
    for p in model.parameters():  # registered after the optimizer's hooks: runs after the update
        p.register_post_accumulate_grad_hook(
            lambda _: held.append(sum(q.grad is not None for q in model.parameters())))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).sum().backward()
    assert len(held) == 6 and max(held) == 0  # no gradient outlives its own update
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert optimizer.grad_norm() > 0 and optimizer.grad_norm() == 0.0  # read once, then a new sum
    optimizer.close()
    after = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).sum().backward()  # no hooks after training
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))


def test_a_non_finite_loss_updates_nothing_and_reads_as_a_bad_step():
    model, optimizer = _model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(4, 8)).sum() * float("nan")).backward()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert torch.isnan(torch.tensor(optimizer.grad_norm()))


@pytest.mark.parametrize(("overrides", "message"), [
    ({}, "optimizer_in_backward updates each tensor during backward, before the global gradient norm is "
         "known: set max_grad_norm: null"),
    ({"max_grad_norm": None, "gradient_accumulation_steps": 2},
     "cannot accumulate gradients: set gradient_accumulation_steps: 1"),
])
def test_settings_it_cannot_honour_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(train_file="x", optimizer_in_backward=True, **overrides)


def test_loading_another_optimizers_state_is_refused():
    _, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match="not the per-parameter state of optimizer_in_backward with 6"):
        optimizer.load_state_dict(torch.optim.AdamW(nn.Linear(2, 2).parameters()).state_dict())


def test_more_than_one_process_is_refused_before_anything_is_hooked(tmp_path):
    from types import SimpleNamespace

    from preftune.engine.config import build_config
    from preftune.engine.loop import Trainer
    from preftune.engine.steps import DatasetSteps
    from preftune.methods.dpo import DPOConfig

    model = nn.Linear(2, 2)
    config = build_config(DPOConfig, base_config(tmp_path, optimizer_in_backward=True, max_grad_norm=0))
    objective = SimpleNamespace(module=model)
    trainer = Trainer(config, objective, DatasetSteps(config, [], collate=None),
                      accelerator=SimpleNamespace(num_processes=2, process_index=0, is_main_process=True))
    with pytest.raises(ValueError,
                       match="optimizer_in_backward updates each tensor before processes could average"):
        trainer.fit()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
