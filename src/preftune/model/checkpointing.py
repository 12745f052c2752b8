"""Activation checkpointing modes for the decoder layers: ``"full"``, ``"selective"`` or ``"off"``.

``enable_checkpointing(model, mode)`` configures a Hugging Face causal LM (or a PEFT model wrapping
one) in place. Every mode computes the same numbers; they differ in what the forward keeps for the
backward and what the backward recomputes.

* ``"full"`` -- what ``preftune.engine.setup.load_policy`` does with ``gradient_checkpointing: true``:
  non-reentrant ``torch.utils.checkpoint`` around every decoder layer. The forward keeps only each
  layer's input hidden states (``[tokens, hidden]`` per layer); the backward runs each layer's forward
  again, matmuls included, before its backward. Least memory; costs one more decoder forward per step
  (about a third of a decoder forward + backward, i.e. +25-33% of the decoder's time).
* ``"selective"`` -- the same per-layer checkpoint, with
  ``context_fn=functools.partial(create_selective_checkpoint_contexts, save_matmuls)``
  (PyTorch selective activation checkpointing). The forward *saves* the outputs of the expensive
  ops -- matrix products (``aten.mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``, ``linear``: the q/k/v/o
  projections, the gate/up/down projections, eager attention's score and value products) and the
  scaled-dot-product-attention kernels (output and logsumexp) -- and the backward's replay of the layer
  takes those from the cache instead of recomputing them; only the cheap elementwise ops in between
  (RMSNorm, rotary embedding, SiLU and the gate product, residual adds, casts, views) are recomputed.
  Time: close to ``"off"`` (the replay costs a few elementwise passes, no matmul). Memory: per layer
  and token, about ``5 * hidden + 2 * kv_dim + 2 * intermediate`` saved values (layer input, q/k/v,
  attention output, o-projection, gate, up, down projection outputs) against roughly
  ``8 * hidden + 2 * kv_dim + 4 * intermediate`` without checkpointing (which also keeps the norm
  inputs and outputs, the rotary outputs, SiLU's output and the gate product), and ``hidden`` with
  ``"full"`` (counted with ``saved_tensors_hooks`` on a Llama; see :func:`activation_bytes`).
  So it removes the recomputation forward for ~55-65% of the activation memory of ``"off"``
  (Llama shapes): the choice when ``"off"`` does not fit but ``"full"``'s extra forward is not wanted.
* ``"off"`` -- no checkpointing (turned off if the model had it on): every activation autograd
  needs is kept; fastest, most memory. The output layer may then keep its ``[scored tokens, vocab]``
  fp32 probabilities for the backward instead of recomputing its logits there
  (``keep_head_probs``: ``load_policy`` turns it on where they fit the memory budget, see
  :func:`head_probs_bytes`).

Only ``GradientCheckpointingLayer`` decoder layers are checkpointed (the embedding, the final norm
and the LM head are not, as with transformers' own checkpointing; preftune's chunked head keeps
its memory bounded on its own). transformers >= 5 binds ``activation_checkpointing_kwargs`` with
``functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)`` and calls it per layer, so
``context_fn`` reaches ``torch.utils.checkpoint.checkpoint`` unchanged;
``create_selective_checkpoint_contexts`` is called once per layer call and returns fresh contexts
each time, as checkpoint requires.

Wiring into a run: call ``enable_checkpointing(model, mode)`` on the loaded model before LoRA is
applied and before the optimizer and ``accelerate.prepare`` (where ``load_policy`` calls
``activation_checkpointing_enable`` today).

``gradient_checkpointing: auto`` (the default): :func:`choose_mode` takes the fastest mode whose
:func:`activation_bytes` fit in the :func:`memory_budget` (or ``memory_budget_gib``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("full", "selective", "off")
#: fastest first: the order :func:`choose_mode` tries them in
BY_SPEED = ("off", "selective", "full")
GIB = 1024**3

_aten = torch.ops.aten
#: ops whose outputs ``"selective"`` saves (everything else is recomputed in the backward's replay)
SAVED_OPS = frozenset({
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.linear, _aten._addmm_activation,
    _aten.scaled_dot_product_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._scaled_dot_product_attention_math,
    _aten._flash_attention_forward,
    _aten._efficient_attention_forward,
    torch.ops.mkldnn._linear_pointwise,  # cpu_linear: onednn (hardware/cpu_linear.py)
})


def save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep matmul and attention outputs, recompute the rest."""
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn(policy=save_matmuls):
    """The ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` that applies ``policy``."""
    return functools.partial(create_selective_checkpoint_contexts, policy)


def checkpointing_mode(model: nn.Module) -> str:
    """The mode :func:`enable_checkpointing` left on ``model`` (``"off"`` if none was set)."""
    return getattr(base_model(model), "_preftune_checkpointing", "off")


def keeps_head_probs(model: nn.Module) -> bool:
    """Whether :func:`enable_checkpointing` told ``model``'s output layer to keep its probabilities."""
    return getattr(base_model(model), "_preftune_keep_head_probs", False)


def enable_checkpointing(model: nn.Module, mode: str, keep_head_probs: bool = False) -> None:
    """Configure activation checkpointing of ``model``'s decoder layers: ``"full"``, ``"selective"``
    or ``"off"`` (see the module docstring for what each saves and recomputes). In place;
    ``config.use_cache`` is set to False when checkpointing is on. ``keep_head_probs`` (only with
    ``"off"``): the output layer keeps its probabilities for the backward (``preftune.model.logps``).
    Raises ValueError for another mode or a model that does not support checkpointing."""
    if mode not in MODES:
        raise ValueError(f"gradient checkpointing mode must be one of {', '.join(MODES)}; got {mode!r}")
    if keep_head_probs and mode != "off":
        raise ValueError(f"keep_head_probs needs gradient checkpointing off, not {mode}: a mode that "
                         "recomputes the decoder recomputes the output layer too")
    base = base_model(model)
    base._preftune_keep_head_probs = keep_head_probs
    if mode == "off":
        if getattr(base, "is_activation_checkpointing", False) or _any_layer_checkpointed(base):
            if hasattr(base, "activation_checkpointing_disable"):
                base.activation_checkpointing_disable()
            else:
                base.gradient_checkpointing_disable()
        base._preftune_checkpointing = "off"
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_context_fn()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "selective" and not _context_fn_bound(base):
        raise RuntimeError("this transformers version does not pass activation_checkpointing_kwargs to "
                           "torch.utils.checkpoint.checkpoint; selective checkpointing is unavailable")
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False
    base._preftune_checkpointing = mode


# -- gradient_checkpointing: auto ----------------------------------------------------------------
def text_config(model: Any) -> Any:
    """The language model's config of a model (PEFT-wrapped or not) or config (image-text: its text part)."""
    config = getattr(base_model(model), "config", model) if isinstance(model, nn.Module) else model
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def activation_bytes(model: Any, positions: int, *, dtype_bytes: int = 4,
                     compute_bytes: int | None = None) -> dict[str, int]:
    """Per mode, the bytes one forward over ``positions`` token positions keeps for its backward
    (``model``: a model, PEFT-wrapped or not, or its config). With ``L`` layers, hidden size ``h``,
    MLP size ``i``, ``kv = num_key_value_heads * head_dim``, ``b = dtype_bytes`` (the weights'
    dtype, kept by the residual stream and the norms) and ``c = compute_bytes`` (the matmuls'
    dtype: 2 under bf16 autocast; default ``b``)::

        full:      positions * (L * h * b                                 + 3 * h * b)
        selective: positions * (L * (h * b + (4h + 2kv + 2i) * c)         + 3 * h * b)
        off:       positions * (L * (6h * b + (2h + 2kv + 4i + x) * c)    + 3 * h * b)

    Per layer: ``full`` keeps the layer input; ``selective`` also the q, k, v, attention, o-, gate-,
    up- and down-projection outputs; ``off`` both norms' input, normalised value and output, the
    rotated q and k, v, the attention output, the gate, SiLU's output, up and their product, and
    ``x = 5h`` casts of the norm outputs when ``c != b`` (autocast); ``3h`` lie outside the layers
    (final norm, the output layer's rows). Left to :func:`memory_budget`'s safety fraction: the
    backward's working memory (one layer's recomputation), the output layer's ``[chunk, vocab]``
    buffer, eager attention's ``[heads, T, T]`` scores, image encoders."""
    config = text_config(model)
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    i = getattr(config, "intermediate_size", None) or 4 * h
    b, c = dtype_bytes, compute_bytes or dtype_bytes
    casts = 5 * h if c != b else 0
    per_layer = {"full": h * b, "selective": h * b + (4 * h + 2 * kv + 2 * i) * c,
                 "off": 6 * h * b + (2 * h + 2 * kv + 4 * i + casts) * c}
    return {mode: positions * (layers * n + 3 * h * b) for mode, n in per_layer.items()}


def head_probs_bytes(model: Any, positions: int) -> int:
    """The output layer's kept probabilities over ``positions`` scored positions: ``[positions,
    vocab]`` in fp32 (``model``: a model, PEFT-wrapped or not, or its config)."""
    return positions * text_config(model).vocab_size * 4


def choose_mode(estimates: dict[str, int], budget_bytes: float | None) -> str:
    """The fastest mode whose estimate fits in ``budget_bytes``: ``"off"``, else ``"selective"``,
    else ``"full"`` (the last resort, also when the budget is unknown: None). Modes missing from
    ``estimates`` are not considered."""
    if budget_bytes is not None:
        for mode in BY_SPEED[:-1]:
            if mode in estimates and estimates[mode] <= budget_bytes:
                return mode
    return "full"


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def head_line(keep: bool, probs_bytes: int, activations_bytes: int, budget_bytes: int | None) -> str:
    """The one log line of the output layer's choice (with checkpointing off)."""
    if budget_bytes is None:
        return "output layer: logits recomputed in backward (free memory unknown)"
    total, budget = _size(activations_bytes + probs_bytes), _size(budget_bytes)
    if keep:
        return (f"output layer: probabilities kept for backward (~{_size(probs_bytes)}; with the activations "
                f"~{total} of a {budget} budget)")
    return (f"output layer: logits recomputed in backward (keeping the probabilities, ~{_size(probs_bytes)}, "
            f"would need ~{total} of a {budget} budget)")


def auto_line(mode: str, estimates: dict[str, int], budget_bytes: int | None, source: str) -> str:
    """The one log line of an auto choice, e.g. ``gradient checkpointing auto -> off (activations
    ~1.3 GiB of a 14.2 GiB budget: memory_budget_gib)``; ``source``: where the budget came from."""
    if budget_bytes is None:
        return f"gradient checkpointing auto -> full (no memory budget: {source}; set memory_budget_gib)"
    faster = next((m for m in reversed(BY_SPEED[: BY_SPEED.index(mode)]) if m in estimates), None)
    need = f"; {faster} would need ~{_size(estimates[faster])}" if faster else ""
    return (f"gradient checkpointing auto -> {mode} (activations ~{_size(estimates[mode])} of a "
            f"{_size(budget_bytes)} budget: {source}{need})")


def free_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on ``device``: CUDA's ``mem_get_info``; on CPU
    ``MemAvailable`` (/proc/meminfo, else psutil; capped by a cgroup v2 ``memory.max``) shared by
    the machine's ``LOCAL_WORLD_SIZE`` processes; None where unknown (MPS, no /proc, no psutil)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    available = _read_int("/proc/meminfo", "MemAvailable:", 1024)
    if available is None:
        try:
            import psutil
        except ImportError:
            return None
        available = psutil.virtual_memory().available
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current") or 0
    available = min(available, max(limit - used, 0)) if limit is not None else available
    return available // max(int(os.environ.get("LOCAL_WORLD_SIZE") or 1), 1)


def memory_budget(model: nn.Module, device: torch.device, *, optimizer_states: int = 2,
                  lora_rank: int | None = None, autocast_bf16: bool = False,
                  safety: float = 0.8) -> int | None:
    """What the activations may take on ``device``: ``safety * (free_memory - reserve)`` (at least 0;
    None when free memory is unknown). ``reserve``: what training will still allocate -- a gradient
    and ``optimizer_states`` moments (AdamW 2, RMSprop 1) per trainable parameter, in its dtype
    (with ``lora_rank``, adapters not added yet: ``r * (in + out)`` per ``nn.Linear`` but the output
    layer, the bound for ``all-linear``); the weights when they are not on ``device`` yet; with
    ``autocast_bf16``, bf16 copies of fp32 weights (2 bytes per parameter)."""
    free = free_memory(device)
    if free is None:
        return None
    params = list(model.parameters())
    if lora_rank is None:
        trainable = [(p.numel(), p.element_size()) for p in params if p.requires_grad]
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        trainable = [(lora_rank * (m.in_features + m.out_features), m.weight.element_size())
                     for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    reserve = sum(n * size for n, size in trainable) * (1 + optimizer_states)
    if any(p.device != device for p in params):
        reserve += sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    if autocast_bf16:
        reserve += 2 * sum(p.numel() for p in params if p.dtype == torch.float32)
    return max(int(safety * (free - reserve)), 0)


def _read_int(path: str, key: str | None = None, unit: int = 1) -> int | None:
    """The number in ``path`` (on its line starting with ``key``) x ``unit``; None: no file, or "max"."""
    try:
        with open(path, encoding="ascii") as f:
            words = next(line.split() for line in f if key is None or line.startswith(key))
        return int(words[1 if key else 0]) * unit
    except (OSError, ValueError, StopIteration):
        return None


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``get_base_model``), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def _layers(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func") and m is not model]


def _any_layer_checkpointed(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _context_fn_bound(model: nn.Module) -> bool:
    """Every checkpointed layer's function is a partial of checkpoint carrying our ``context_fn``."""
    layers = [m for m in _layers(model) if getattr(m, "gradient_checkpointing", False)]
    return bool(layers) and all("context_fn" in getattr(m._gradient_checkpointing_func, "keywords", {})
                                for m in layers)
