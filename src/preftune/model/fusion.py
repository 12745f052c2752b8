"""``compile: true``: the elementwise chains of each decoder layer fused by ``torch.compile``.

Where the decoder dominates and sequences are long, a quarter of a step is elementwise work on
``[tokens, hidden]`` and ``[tokens, intermediate]`` tensors, each op a full pass over memory:

    RMSNorm   y = w * x / sqrt(mean(x^2) + eps)            (pow, mean, add, rsqrt, mul, mul, casts)
    SwiGLU    m = down(silu(gate(x)) * up(x))              (silu, mul between the matmuls)

:func:`compile_layers` compiles, in place (``nn.Module.compile``, so parameter names and
checkpoints do not change), every norm module of every decoder layer and each dense MLP (one with
``gate_proj``, ``up_proj`` and ``down_proj``; mixture-of-experts blocks route tokens and are left
alone), with ``dynamic=True``: the token count differs from batch to batch and must not recompile.
Inductor fuses each chain into one or two kernels, forward and backward; the matmuls stay the
usual ones. Attention (per segment, ``model/attention.py``) is not compiled. The numbers equal the
uncompiled model's to fp32 rounding (the tests check 1e-5 in log-probs and gradients).

Costs: the first forward and backward compile (seconds on a small model, more on a large one);
on CPU inductor needs a C++ compiler. Checkpointing ``selective`` is not combined with it (its
dispatch policy does not see inside compiled regions): ``auto`` then chooses between ``off`` and
``full``.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from preftune.model.checkpointing import base_model

DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


def _fusable(name: str, module: nn.Module) -> bool:
    kind = type(module).__name__
    if kind.endswith(("RMSNorm", "LayerNorm")):
        return True
    return name == "mlp" and all(hasattr(module, p) for p in DENSE_MLP) and not hasattr(module, "experts")


def compile_layers(model: nn.Module) -> int:
    """Compile the norms and dense MLPs of ``model``'s decoder layers (PEFT-wrapped or not) in
    place; returns how many modules were compiled (0: the model has no such layers)."""
    count = 0
    layers = [m for m in base_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        for name, module in layer.named_children():
            if _fusable(name, module):
                module.compile(dynamic=True)
                count += 1
    return count


def compiler_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None: inductor's CPU code needs a
    C++ compiler (``$CXX`` or ``g++``/``clang++``)."""
    if device.type != "cpu":
        return None
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if any(shutil.which(n) for n in names):
        return None
    return "compile: true needs a C++ compiler on CPU (torch.compile's inductor); install g++ or set CXX"
