"""The training loop on a tiny model: learning, accumulation, resume, references, LoRA, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    LOSS_RTOL,
    assert_logps_close,
    assert_weights_close,
    base_config,
    crash_at,
    save_tiny_model,
)
from preftune.methods.dpo import train_dpo


def final_weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run.train.final_dir / "model.safetensors"))


def assert_identical_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_lowers_loss_and_raises_accuracy(tmp_path):
    run = train_dpo(base_config(tmp_path, max_steps=30, logging_steps=5, loss_params={"beta": 0.5},
                                eval_file=str(tmp_path / "train.jsonl")))
    first, last = run.train.history[0], run.train.history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["rewards/accuracies"] > 0.9 > first["rewards/accuracies"]
    assert run.train.eval_history[-1]["eval/rewards/accuracies"] > 0.9
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "dpo/grad_weight", "lr", "grad_norm", "tokens_per_s"):
        assert key in last
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(run.train.history) + len(run.train.eval_history)


def test_gradient_accumulation_equals_big_batch(tmp_path):
    big = train_dpo(base_config(tmp_path, max_steps=2, batch_size=8, output_dir=str(tmp_path / "a"),
                                max_grad_norm=0.05))
    small = train_dpo(base_config(tmp_path, max_steps=2, batch_size=2, gradient_accumulation_steps=4,
                                  output_dir=str(tmp_path / "b"), max_grad_norm=0.05))
    # 8 pairs at once or 4 x 2 accumulated: the same arithmetic in other sums, so close, not equal
    assert_weights_close(final_weights(big), final_weights(small), lr=1e-3)
    for a, b in zip(big.train.history, small.train.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        # the norm of a gradient whose elements are each within helpers.GRAD_RTOL of its size
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_interruption_gives_same_weights(tmp_path, lora):
    settings = dict(max_steps=6, batch_size=4, save_steps=2, lora=lora, lr_scheduler="cosine", warmup_steps=2)
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))

    with pytest.raises(KeyboardInterrupt):
        train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), **settings),
                  callbacks=[crash_at(5)])
    assert (tmp_path / "cut" / "checkpoint-4").is_dir() and not (tmp_path / "cut" / "final").exists()
    resumed = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), resume=True, **settings))
    # bitwise: the same process, thread count, kernels and batches; a resume restores every state exactly
    assert_identical_weights(final_weights(whole), final_weights(resumed))
    assert [r["step"] for r in resumed.train.history] == [5, 6]
    assert resumed.train.history[-1]["loss"] == whole.train.history[-1]["loss"]


def test_lora_saves_adapter_and_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run = train_dpo(base_config(tmp_path, lora=True, lora_target_modules=["q_proj", "v_proj"]))
    assert run.reference_mode == "precomputed"  # auto: 6 steps x 8 pairs cover the 32 training pairs
    assert (run.train.final_dir / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(run.train.final_dir)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    changed = [n for n, p in merged.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_reference_modes_agree_when_policy_and_reference_differ(tmp_path):
    """Policy = base + LoRA; the reference is the base as an adapter-off view, a frozen copy, or a cache."""
    save_tiny_model(tmp_path / "model")
    common = dict(lora=True, max_steps=4, batch_size=4, learning_rate=5e-3)
    cache = str(tmp_path / "cache")
    runs = {
        mode: train_dpo(base_config(tmp_path, output_dir=str(tmp_path / mode), reference=mode,
                                    reference_model=None if mode == "adapter" else str(tmp_path / "model"),
                                    reference_cache_dir=cache if mode == "precomputed" else None,
                                    **common))
        for mode in ("adapter", "model", "precomputed")
    }
    losses = {mode: [r["loss"] for r in run.train.history] for mode, run in runs.items()}
    assert losses["adapter"][-1] < losses["adapter"][0]  # the policy moved away from the reference
    # the reference's sums of ~50 nats by other modules or batches (the cache: scored once, ahead) may
    # be a few ulps (~1e-5) apart: losses ~0.7 and rewards beta * (policy - reference) then move by
    # ~beta * 1e-5 = 1e-6 (beta 0.1); a wrong reference moves them by ~beta * 1 nat
    for mode in ("model", "precomputed"):
        assert losses[mode] == pytest.approx(losses["adapter"], abs=1e-5)
        assert [r["rewards/chosen"] for r in runs[mode].train.history] == pytest.approx(
            [r["rewards/chosen"] for r in runs["adapter"].train.history], abs=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_by_the_starting_policy_equals_a_scored_reference(tmp_path, lora):
    """auto -> precomputed, filled by the policy itself before its first update (no second model):
    the whole run equals one that scores a separate frozen reference (or the adapter-off view) every step."""
    common = dict(max_steps=4, batch_size=8, lora=lora, learning_rate=5e-3 if lora else 1e-3)
    # a cache of its own: entries are keyed by content, so another test's identical run would be reused
    auto = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "auto"),
                                 reference_cache_dir=str(tmp_path / "c"), **common))
    scored = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "scored"),
                                   reference="adapter" if lora else "model", **common))
    assert auto.reference_mode == "precomputed" and auto.reference_cache_reused is False
    assert scored.reference_mode in ("adapter", "model")
    for key in ("loss", "rewards/chosen", "rewards/margins"):  # as in the test above: ~1e-6 apart at most
        assert [r[key] for r in auto.train.history] == pytest.approx([r[key] for r in scored.train.history],
                                                                     abs=1e-5)
    assert auto.train.history[-1]["loss"] < auto.train.history[0]["loss"]


def test_auto_reference_precomputes_only_when_the_run_covers_the_data():
    from preftune.methods.dpo import DPOConfig

    def mode(**kw):
        return DPOConfig(train_file="t.jsonl", **kw).reference_mode(num_train_pairs=100)

    assert mode() == "precomputed"  # one epoch
    assert mode(max_steps=13, batch_size=8) == "precomputed" and mode(max_steps=12, batch_size=8) == "model"
    assert mode(max_steps=2, lora=True) == "adapter"
    assert mode(epochs=0.5) == "model" and mode(reference="precomputed", max_steps=1) == "precomputed"
    assert DPOConfig(train_file="t.jsonl", max_steps=13, batch_size=4).reference_mode(100, 2) == "precomputed"
    assert mode(loss="simpo") == "none"


def test_reference_logps_agree_directly(tmp_path):
    from peft import LoraConfig, get_peft_model

    from helpers import random_pairs
    from preftune.data.batching import collate
    from preftune.model.load import load_model
    from preftune.model.logps import SequenceScorer
    from preftune.model.reference import AdapterReference, FrozenReference, precompute_reference

    save_tiny_model(tmp_path / "model")
    peft = get_peft_model(load_model(str(tmp_path / "model")),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the policy now differs from its base
    policy = SequenceScorer(peft)
    pairs = random_pairs(6, seed=5)
    batch = collate(pairs, range(6))
    frozen = FrozenReference(load_model(str(tmp_path / "model")))
    cache = precompute_reference(frozen, [collate(pairs[:3], range(3)), collate(pairs[3:], range(3, 6))], 6,
                                 tmp_path / "cache", "k")
    expected = frozen(batch)
    for got in (AdapterReference(policy)(batch), cache(batch)):  # other modules or batches
        assert_logps_close(got, expected)
    with pytest.raises(AssertionError):  # the policy itself is told apart (its sums differ by 0.04-0.7 nats)
        assert_logps_close(policy(batch), expected)


def test_reference_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    import preftune.model.reference as reference

    computed = []
    original = reference.precompute_reference

    def counting(*args, **kwargs):
        kwargs["on_compute"] = lambda: computed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("preftune.methods.dpo.precompute_reference", counting)
    cache = str(tmp_path / "cache")

    def run(name, **kw):
        kw.setdefault("max_steps", 2)
        return train_dpo(base_config(tmp_path, output_dir=str(tmp_path / name), reference="precomputed",
                                     reference_cache_dir=cache, **kw))

    first = run("r1")
    assert first.reference_cache_reused is False and computed == [1]
    second = run("r2")
    assert second.reference_cache_reused is True and second.reference_cache == first.reference_cache
    # resume reads the same cache (the reference is the original model, not the checkpoint)
    run("r3", save_steps=1)
    resumed = run("r3", save_steps=1, resume=True, max_steps=3)
    assert resumed.reference_cache == first.reference_cache and len(computed) == 1
    # a change of tokenization, data or reference model gives a new key
    assert run("t", max_completion_length=2).reference_cache != first.reference_cache
    save_tiny_model(tmp_path / "other_model", seed=7)
    assert run("m", reference_model=str(tmp_path / "other_model")).reference_cache != first.reference_cache
    from helpers import write_pairs

    write_pairs(tmp_path / "other.jsonl", seed=9)
    assert run("d", train_file=str(tmp_path / "other.jsonl")).reference_cache != first.reference_cache
    assert len(computed) == 4


def test_checkpoint_write_is_atomic(tmp_path):
    from preftune.engine.checkpoint import latest_checkpoint, write_atomically

    def broken(directory):
        (directory / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(tmp_path / "checkpoint-3", broken)
    assert list(tmp_path.iterdir()) == [] and latest_checkpoint(tmp_path) is None


def test_bf16_and_rmsprop_and_gradient_checkpointing_run(tmp_path):
    run = train_dpo(base_config(tmp_path, precision="bf16", optimizer="rmsprop", gradient_checkpointing=True,
                                max_steps=2, learning_rate=1e-4, report_to="tensorboard"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in run.train.history)
    assert any((tmp_path / "out" / "tensorboard").iterdir())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_modes_train_to_the_same_weights(tmp_path, lora):
    from preftune.engine.config import build_config
    from preftune.engine.setup import load_policy
    from preftune.methods.dpo import DPOConfig
    from preftune.model.checkpointing import checkpointing_mode

    finals = {}
    for mode in ("off", "full", "selective"):
        config = base_config(tmp_path, gradient_checkpointing=mode, max_steps=3, lora=lora,
                             output_dir=str(tmp_path / mode))
        # the config reaches the model
        assert checkpointing_mode(load_policy(build_config(DPOConfig, config))) == mode
        train_dpo(config)
        finals[mode] = load_file(str(tmp_path / mode / "final" / "model.safetensors"))
    for mode in ("full", "selective"):  # recomputed activations: the same arithmetic, maybe other kernels
        assert_weights_close(finals[mode], finals["off"], lr=1e-3)  # base_config's learning rate


@pytest.mark.parametrize("value", ["partial", 2])
def test_checkpointing_mode_typos_are_one_line_errors(tmp_path, value):
    with pytest.raises(ValueError, match="config: gradient_checkpointing must be"):
        train_dpo(base_config(tmp_path, gradient_checkpointing=value))
