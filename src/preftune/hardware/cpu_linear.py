"""``cpu_linear``: which library runs the decoder's fp32 linear layers on the CPU.

PyTorch sends an fp32 ``nn.Linear`` on the CPU to its BLAS (MKL in the x86 wheels). oneDNN, which
the same wheels carry for bf16 and for ``torch.compile``, has its own fp32 matrix kernels, and on the
benchmark machine (AMD EPYC, AVX-512) they ran a decoder's ``[tokens, 512] x [512, 512 | 1408]``
products 1.05-1.3x faster than MKL, forward and input gradient alike, while MKL stayed faster for the
weight gradient (``benchmarks/SHAPES.md``, fifth pass). :class:`OneDNNLinear` takes the fastest of
each: for ``y = x W^T + b`` (x ``[..., in]``, W ``[out, in]``)

    forward        y  = x W^T + b      oneDNN   (``torch.ops.mkldnn._linear_pointwise``)
    input grad     dx = dy W           oneDNN   (the same op with W^T as its weight)
    weight grad    dW = dy^T x         BLAS     (``torch.mm``)
    bias grad      db = sum_rows(dy)

Both are IEEE fp32 with fp32 accumulation, only the summation order differs (to ~1e-6 relative per
product; the tests check log-probs and gradients to 1e-5 against ``nn.Linear``). It saves what
``nn.Linear``'s autograd saves (x and W), so memory is unchanged.

``cpu_linear`` (config): ``onednn``; ``torch`` (PyTorch's own path); ``auto`` (default): ``onednn``
when the CLI trains on an x86 CPU whose PyTorch has oneDNN, else ``torch`` (a library call with the
default changes no classes or variables: :mod:`preftune.hardware`). :func:`use_onednn` swaps the
class of the model's plain ``nn.Linear`` modules in place (parameters, names and checkpoints do not
change), before LoRA wraps them; the output layer's chunked log-probs (``model/logps.py``) then run
their logits and hidden-state gradients through oneDNN too. A swapped layer runs PyTorch's path for
anything but fp32 on the CPU outside autocast and ``torch.compile`` (``compile: true``: inductor picks
the kernels of the regions it compiles), so a model that moves to a GPU or runs under bf16 autocast is
unaffected.
"""

from __future__ import annotations

import os
import platform

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

CPU_LINEAR_SETTINGS = ("auto", "onednn", "torch")
#: oneDNN and ideep (PyTorch's layer over it) cache each product's primitive per input shape, 1,024 of
#: them by default, and a primitive holds buffers of about its output's size: over an epoch of batches
#: whose token counts all differ, that grew a long-completion run's peak from 3.1 to 6.1 GiB. Without
#: the caches (primitives rebuilt per call) the memory stays flat and the products as fast. Both are
#: read at the first use in the process; a value in the environment wins.
CACHE_LIMITS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight^T + bias`` by oneDNN in fp32: x ``[M, in]``, weight ``[out, in]`` (any strides)
    -> ``[M, out]``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with the products split between oneDNN and BLAS as the module docstring says."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        flat = x.reshape(-1, x.shape[-1])
        return onednn_linear(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        grad_x = onednn_linear(g, weight.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU products run through :class:`OneDNNLinearFunction`;
    ``fp32_linear`` tells the chunked output layer (``model/logps.py``) to run its products by oneDNN too."""

    fp32_linear = staticmethod(onednn_linear)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
            return super().forward(x)
        return OneDNNLinearFunction.apply(x, self.weight, self.bias)


def onednn_available() -> bool:
    """Whether this PyTorch can run :class:`OneDNNLinear` (built with oneDNN, the op registered)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve(setting: str, device_type: str, *, process_owned: bool = True) -> tuple[str, str]:
    """(``onednn`` or ``torch``, why) for ``cpu_linear: setting``; ValueError where an explicit
    ``onednn`` cannot apply. ``auto`` swaps nothing unless ``process_owned`` (the CLI runs)."""
    if setting == "torch":
        return "torch", "as configured"
    if setting == "onednn":
        if device_type != "cpu":
            raise ValueError(f"config: cpu_linear: onednn runs linear layers on the CPU, but training runs "
                             f"on {device_type}; use auto or torch")
        if not onednn_available():
            raise ValueError("config: cpu_linear: onednn needs a PyTorch built with oneDNN "
                             "(torch.backends.mkldnn.is_available() is False here); use auto or torch")
        return "onednn", "as configured"
    if device_type != "cpu":
        return "torch", f"training on {device_type}"
    if not process_owned:
        return "torch", "a library call swaps no layer classes and sets no variables; cpu_linear: onednn does"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "torch", f"not an x86 CPU ({platform.machine()})"
    if not onednn_available():
        return "torch", "this PyTorch has no oneDNN"
    return "onednn", "oneDNN's fp32 kernels for the forward and input gradient, BLAS for the weight gradient"


def use_onednn(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` to :class:`OneDNNLinear` in place; returns how many.
    Also turns off oneDNN's and ideep's per-shape caches (:data:`CACHE_LIMITS`) unless the
    environment sets them."""
    for name, value in CACHE_LIMITS.items():
        os.environ.setdefault(name, value)
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count


def configure(model: nn.Module, setting: str, device_type: str, *, process_owned: bool = True) -> str:
    """Resolve and apply ``cpu_linear`` to ``model``; returns the one log line that states the choice."""
    choice, why = resolve(setting, device_type, process_owned=process_owned)
    if choice == "onednn":
        count = use_onednn(model)
        return f"cpu_linear: onednn ({count} linear layers; {why})"
    return f"cpu_linear: torch ({why})"
