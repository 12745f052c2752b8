"""Activation checkpointing modes for the decoder layers: ``"full"``, ``"selective"`` or ``"off"``.

``enable_checkpointing(model, mode)`` configures a Hugging Face causal LM (or a PEFT model wrapping
one) in place. Every mode computes the same numbers; they differ in what the forward keeps for the
backward and what the backward recomputes.

* ``"full"`` -- what ``preftune.train.setup.load_policy`` does with ``gradient_checkpointing: true``:
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
  and token, about ``4 * hidden + 2 * kv_dim + 2 * intermediate`` saved values (layer input, q/k/v,
  attention output, o-projection, gate, up, down projection outputs) against roughly
  ``6 * hidden + 2 * kv_dim + 4 * intermediate`` without checkpointing (which also keeps the norm
  outputs, the rotary outputs, SiLU's output and the gate product), and ``hidden`` with ``"full"``.
  So it removes the recomputation forward for ~55-65% of the activation memory of ``"off"``
  (Llama shapes): the choice when ``"off"`` does not fit but ``"full"``'s extra forward is not wanted.
* ``"off"`` -- no checkpointing (turned off if the model had it on): every activation autograd
  needs is kept; fastest, most memory.

Only ``GradientCheckpointingLayer`` decoder layers are checkpointed (the embedding, the final norm
and the LM head are not, as with transformers' own checkpointing; preftune's chunked head keeps
its memory bounded on its own). transformers >= 5 binds ``activation_checkpointing_kwargs`` with
``functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)`` and calls it per layer, so
``context_fn`` reaches ``torch.utils.checkpoint.checkpoint`` unchanged; ``create_selective_checkpoint_contexts``
is called once per layer call and returns fresh contexts each time, as checkpoint requires.

Wiring into a run: call ``enable_checkpointing(model, mode)`` on the loaded model before LoRA is
applied and before the optimizer and ``accelerate.prepare`` (where ``load_policy`` calls
``activation_checkpointing_enable`` today).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("full", "selective", "off")

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
    return getattr(_base(model), "_preftune_checkpointing", "off")


def enable_checkpointing(model: nn.Module, mode: str) -> None:
    """Configure activation checkpointing of ``model``'s decoder layers: ``"full"``, ``"selective"``
    or ``"off"`` (see the module docstring for what each saves and recomputes). In place;
    ``config.use_cache`` is set to False when checkpointing is on. Raises ValueError for another mode
    or a model that does not support checkpointing."""
    if mode not in MODES:
        raise ValueError(f"gradient checkpointing mode must be one of {', '.join(MODES)}; got {mode!r}")
    base = _base(model)
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


def _base(model: nn.Module) -> nn.Module:
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
