"""Activation checkpointing modes (preftune.model.checkpointing): every mode gives the plain model's
log-probs and gradients in every layout; "selective" does not recompute matmuls or attention."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (
    all_lengths_differ,
    assert_grads_close,
    assert_logps_close,
    plain_logps,
    random_pairs,
    tiny_llama,
)
from preftune.data.batching import collate
from preftune.model.checkpointing import MODES, checkpointing_mode, enable_checkpointing, keeps_head_probs
from preftune.model.logps import SequenceScorer

pytestmark = pytest.mark.usefixtures("one_thread")


BATCHES = {"mixed": random_pairs(6, seed=1), "one": random_pairs(1, seed=2),
           "all_differ": all_lengths_differ()}
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


#: every mode, and "off" with the output layer's probabilities kept for backward
PLANS = [(mode, False) for mode in MODES] + [("off", True)]


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,keep", PLANS, ids=[m + ("+keep" if k else "") for m, k in PLANS])
def test_modes_give_the_plain_logps_and_gradients(mode, keep, layout, name, expected):
    pairs = BATCHES[name]
    model = tiny_llama().train()
    enable_checkpointing(model, mode, keep_head_probs=keep)
    assert checkpointing_mode(model) == mode and keeps_head_probs(model) == keep
    layers = model.model.layers
    assert all(layer.gradient_checkpointing == (mode != "off") for layer in layers)
    got = SequenceScorer(model, chunk_size=5)(collate(pairs, layout=layout))
    (torch.cat([got.chosen, got.rejected]) * _weights(pairs)).sum().backward()
    want, want_grads = expected[name]
    assert_logps_close(got, want)  # other layouts and recomputation against the padded plain forward
    assert_grads_close(_grads(model), want_grads)


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


def _backward_ops(mode: str, attn: str, keep_head_probs: bool = False) -> Counter[str]:
    pairs = BATCHES["mixed"]
    model = tiny_llama(attn=attn).train()
    enable_checkpointing(model, mode, keep_head_probs)
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
    if attn == "sdpa":  # unpadded (model/attention.py): per pair, prompt + chosen and rejected calls
        assert n(full, FORWARD_ATTENTION) == layers * 2 * len(BATCHES["mixed"])
        assert n(selective, FORWARD_ATTENTION) == n(off, FORWARD_ATTENTION) == 0
    # the cheap ops are recomputed in both checkpointing modes, never without checkpointing
    for counts in (full, selective):
        assert counts["rsqrt"] == 2 * layers and counts["silu"] == layers
    assert off["rsqrt"] == off["silu"] == 0


def test_kept_probabilities_spare_the_output_layer_one_matmul_per_chunk():
    """With the probabilities kept, backward runs no logits matmul and no exp: one matmul fewer per
    chunk of 5 scored positions."""
    recompute, keep = _backward_ops("off", "sdpa"), _backward_ops("off", "sdpa", keep_head_probs=True)
    chunks = -(-collate(BATCHES["mixed"], layout="prefix_shared").score_index.numel() // 5)
    assert chunks > 1 and recompute["mm"] - keep["mm"] == chunks
    assert recompute["exp_"] == chunks and keep["exp_"] == 0
    with pytest.raises(ValueError, match="keep_head_probs needs gradient checkpointing off, not full"):
        enable_checkpointing(tiny_llama(), "full", keep_head_probs=True)


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
    assert_logps_close(got, want)


# -- gradient_checkpointing: auto -------------------------------------------------------------------
def test_choose_mode_picks_the_fastest_that_fits_as_the_budget_shrinks():
    from preftune.model.checkpointing import choose_mode

    estimates = {"off": 300, "selective": 200, "full": 100}
    assert [choose_mode(estimates, b) for b in (10**9, 300, 299, 200, 199, 100, 1, 0)] == \
        ["off", "off", "selective", "selective", "full", "full", "full", "full"]
    assert choose_mode(estimates, None) == "full"  # unknown budget: the last resort


def _saved_bytes(model, mode: str, batch, precision: str, monkeypatch) -> int:
    """Bytes of the distinct storages one forward keeps for its backward: autograd's saved tensors
    (``saved_tensors_hooks``: outside checkpointed layers, and the checkpointed layers' inputs) plus
    what selective checkpointing caches (its policy sees each saved op's output)."""
    from torch.utils.checkpoint import CheckpointPolicy

    import preftune.model.checkpointing as ck

    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def recording(ctx, op, *args, **kwargs):
        policy = ck.save_matmuls(ctx, op, *args, **kwargs)
        if policy == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            if not hasattr(ctx, "op_output"):
                pytest.skip("this torch's SelectiveCheckpointContext has no op_output")
            torch.utils._pytree.tree_map(keep, ctx.op_output)
        return policy

    original = ck.selective_context_fn
    monkeypatch.setattr(ck, "selective_context_fn", lambda policy=recording: original(policy))
    enable_checkpointing(model, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = SequenceScorer(model, chunk_size=16)(batch)
        (out.chosen.sum() + out.rejected.sum()).backward()
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_is_within_2x_of_the_saved_tensors(precision, monkeypatch):
    from preftune.model.checkpointing import activation_bytes

    pairs = random_pairs(8, seed=3, max_len=24)
    batch = collate(pairs, layout="prefix_shared")  # runs unpadded: one stream of the real tokens
    positions = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    estimates = activation_bytes(tiny_llama(), positions, dtype_bytes=4,
                                 compute_bytes=2 if precision == "bf16" else None)
    measured = {mode: _saved_bytes(tiny_llama().train(), mode, batch, precision, monkeypatch)
                for mode in MODES}
    for mode in MODES:  # measured (fp32, bf16): full 205k, 205k; selective 948k, 582k; off 1822k, 1299k bytes
        assert measured[mode] / 2 <= estimates[mode] <= 2 * measured[mode], (mode, measured, estimates)
    assert estimates["off"] > estimates["selective"] > estimates["full"]
    assert measured["off"] > measured["selective"] > measured["full"]


def test_activation_estimate_reads_the_text_config_of_image_text_and_peft_models():
    from transformers import CLIPVisionConfig, LlavaConfig

    from preftune.model.checkpointing import activation_bytes, text_config
    from preftune.model.load import apply_lora

    model = tiny_llama()
    want = activation_bytes(model.config, 100)
    llava = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       image_size=8, patch_size=4),
                        text_config=model.config.to_dict())
    assert text_config(llava).hidden_size == 32 and activation_bytes(llava, 100) == want
    wrapped = apply_lora(tiny_llama(), r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj"])
    assert text_config(wrapped) is wrapped.get_base_model().config and activation_bytes(wrapped, 100) == want


def _auto_policy(tmp_path, caplog, match="gradient checkpointing", **overrides):
    import logging

    from helpers import base_config
    from preftune.engine.config import build_config
    from preftune.engine.setup import load_policy
    from preftune.methods.dpo import DPOConfig

    config = build_config(DPOConfig, base_config(tmp_path, **overrides))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="preftune"):
        model = load_policy(config)
    lines = [r.getMessage() for r in caplog.records if match in r.getMessage()]
    return model, lines


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_auto_follows_the_memory_budget_in_one_log_line(tmp_path, caplog, lora):
    from helpers import save_tiny_model
    from preftune.model.checkpointing import activation_bytes

    save_tiny_model(tmp_path / "model")
    estimates = activation_bytes(tiny_llama(), 2 * 8 * 1024)  # batch_size 8, max_length 1024 (the defaults)
    middle = (estimates["selective"] + estimates["off"]) / 2 / 2**30
    for budget, mode in [(1000.0, "off"), (middle, "selective"), (1e-9, "full")]:
        model, lines = _auto_policy(tmp_path, caplog, memory_budget_gib=budget, lora=lora)
        assert checkpointing_mode(model) == mode and hasattr(model, "peft_config") == lora
        layers = model.get_base_model().model.layers if lora else model.model.layers
        assert all(layer.gradient_checkpointing == (mode != "off") for layer in layers)
        assert len(lines) == 1 and lines[0].startswith(
            f"gradient checkpointing auto -> {mode} (activations ~"), lines
        assert "budget: memory_budget_gib" in lines[0]
    # the default is auto; its budget comes from this machine's free memory (a tiny model fits anywhere)
    model, lines = _auto_policy(tmp_path, caplog, lora=lora)
    assert (checkpointing_mode(model) == "off" and len(lines) == 1
            and "budget: 0.8 x (free " in lines[0]), lines
    # an explicit mode logs nothing and is what the model gets
    model, lines = _auto_policy(tmp_path, caplog, lora=lora, gradient_checkpointing="selective")
    assert checkpointing_mode(model) == "selective" and lines == []


def test_off_keeps_the_output_layers_probabilities_where_they_fit_the_budget(tmp_path, caplog):
    from helpers import save_tiny_model
    from preftune.model.checkpointing import GIB, activation_bytes, head_probs_bytes

    save_tiny_model(tmp_path / "model")
    positions = 2 * 8 * 1024  # batch_size 8, max_length 1024 (the defaults)
    off, probs = activation_bytes(tiny_llama(), positions)["off"], head_probs_bytes(tiny_llama(), positions)
    assert probs == positions * 64 * 4
    for budget, keep, start in [(1000.0, True, "output layer: probabilities kept for backward (~"),
                                ((off + probs / 2) / GIB, False,
                                 "output layer: logits recomputed in backward (keeping the probabilities, "
                                 "~")]:
        model, lines = _auto_policy(tmp_path, caplog, match="output layer", memory_budget_gib=budget)
        assert checkpointing_mode(model) == "off" and keeps_head_probs(model) == keep
        assert len(lines) == 1 and lines[0].startswith(start), lines
    # configured off: the budget is this machine's free memory, or memory_budget_gib;
    # checkpointing modes recompute
    model, lines = _auto_policy(tmp_path, caplog, match="output layer", gradient_checkpointing="off")
    assert keeps_head_probs(model) and len(lines) == 1, lines
    model, lines = _auto_policy(tmp_path, caplog, match="output layer", gradient_checkpointing="off",
                                memory_budget_gib=(off + probs / 2) / GIB)
    assert checkpointing_mode(model) == "off" and not keeps_head_probs(model) and len(lines) == 1, lines
    model, lines = _auto_policy(tmp_path, caplog, match="output layer", gradient_checkpointing="full")
    assert not keeps_head_probs(model) and lines == []


def test_memory_budget_without_auto_and_bad_budgets_are_one_line_errors():
    from preftune.engine.config import load_config
    from preftune.methods.dpo import DPOConfig

    assert DPOConfig(train_file="d.jsonl").gradient_checkpointing == "auto"
    cases = [({"gradient_checkpointing": "full", "memory_budget_gib": 4.0},
              "config: memory_budget_gib has no effect with gradient_checkpointing: full "
              "(only with auto or off); remove it"),
             ({"gradient_checkpointing": True, "memory_budget_gib": 4.0},
              "config: memory_budget_gib has no effect with gradient_checkpointing: true "
              "(only with auto or off); remove it"),
             ({"memory_budget_gib": -1.0}, "config: memory_budget_gib must be > 0 or null, got -1.0"),
             ({"memory_budget_gib": 0.0}, "config: memory_budget_gib must be > 0 or null, got 0.0"),
             ({"gradient_checkpointing": "selctive"},
              "config: gradient_checkpointing must be 'auto', 'full', 'selective', 'off', true or false, "
              "got 'selctive'")]
    for settings, message in cases:
        with pytest.raises(ValueError) as error:
            DPOConfig(train_file="d.jsonl", **settings)
        assert str(error.value) == message
    config = load_config(DPOConfig, None, ["--train_file", "d.jsonl", "--gradient_checkpointing", "auto",
                                           "--memory_budget_gib", "4"])
    assert config.checkpointing_mode == "auto" and config.memory_budget_gib == 4.0
    assert load_config(DPOConfig, None, ["--train_file", "d.jsonl", "--gradient_checkpointing", "off"]
                       ).checkpointing_mode == "off"


def test_cli_typo_of_a_mode_lists_the_modes_in_one_line(tmp_path, capsys):
    from preftune.cli import main

    (tmp_path / "d.jsonl").write_text("")
    assert main(["dpo", "--train_file", str(tmp_path / "d.jsonl"), "--gradient_checkpointing",
                 "selctive"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["preftune dpo: error: config: gradient_checkpointing must be 'auto', 'full', 'selective', "
                   "'off', true or false, got 'selctive'"]
    assert main(["dpo", "--train_file", str(tmp_path / "d.jsonl"), "--gradient_checkpointing", "full",
                 "--memory_budget_gib", "4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "preftune dpo: error: config: memory_budget_gib has no effect with "
        "gradient_checkpointing: full (only with auto or off); remove it")


def test_memory_budget_leaves_room_for_gradients_and_optimizer_state(monkeypatch):
    import preftune.model.checkpointing as ck

    model, cpu = tiny_llama(), torch.device("cpu")
    assert ck.free_memory(cpu) > 0 and ck.free_memory(torch.device("meta")) is None
    monkeypatch.setattr(ck, "free_memory", lambda device: 10**8)
    params = sum(p.numel() for p in model.parameters())
    # fp32 grad + AdamW's 2 moments
    assert ck.memory_budget(model, cpu) == int(0.8 * (10**8 - 4 * params * 3))
    assert ck.memory_budget(model, cpu, optimizer_states=1) == int(0.8 * (10**8 - 4 * params * 2))  # RMSprop
    adapters = sum(4 * (m.in_features + m.out_features) for m in model.model.modules()
                   if isinstance(m, torch.nn.Linear))
    # before LoRA is added
    assert ck.memory_budget(model, cpu, lora_rank=4) == int(0.8 * (10**8 - 4 * adapters * 3))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    on_gpu = ck.memory_budget(model, torch.device("meta"))  # weights not moved to the device yet
    assert on_gpu == int(0.8 * (10**8 - 4 * params * 3 - weights))
    assert ck.memory_budget(model, cpu, autocast_bf16=True) == int(
        0.8 * (10**8 - 4 * params * 3 - 2 * params))
    monkeypatch.setattr(ck, "free_memory", lambda device: 10)
    assert ck.memory_budget(model, cpu) == 0
