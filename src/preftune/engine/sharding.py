"""How a trained module is spread over processes: replicated (DDP through accelerate) or fully sharded
(FSDP2: torch's ``fully_shard`` on each decoder layer and at the root).

Sharding splits every parameter, its gradient and its optimizer state over the N processes: each
holds 1/N of them between uses, a layer's parameters are all-gathered for its forward (and again for
its backward), its gradients are reduce-scattered (averaged) after its backward. The arithmetic is
DDP's: each process's micro-batch gradient, averaged over processes. The same wrapping code runs on
GPUs and on CPU processes (gloo): accelerate gates FSDP to accelerator devices, torch does not, so
preftune applies ``fully_shard`` itself and never lets a run asked to shard fall back to DDP.

A sharded run's intermediate checkpoints are written with ``torch.distributed.checkpoint`` (each
process writes its shards of the module and optimizer state; :func:`save_sharded` /
:func:`load_sharded`, loadable with another number of processes); ``final/`` is consolidated
(:meth:`FullyShard.consolidated`): one Hugging Face directory, as from one process.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint directory (model and optimizer)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class a Hugging Face model lists in its
    ``_no_split_modules`` (the classes accelerate's transformer wrap policy uses)."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return [sub for sub in module.modules() if type(sub).__name__ in names]


def has_unread_parameters(model: nn.Module) -> bool:
    """Whether some trainable parameters of ``model`` may get no gradient in a step: an image-text model's
    vision tower (layers after the one its features come from, a pooling head)."""
    from preftune.model.vision import is_vision_config

    config = getattr(model, "config", None)
    return config is not None and is_vision_config(config)


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters live on the meta device (no memory);
    buffers are copied. Filled by ``load_state_dict(..., assign=True)`` to save a consolidated model."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()}
    return copy.deepcopy(module, memo)


class Replicated:
    """Every process holds the whole module (DDP, through accelerate's ``prepare``)."""

    name = "ddp"

    def shard(self, module: nn.Module, frozen: Sequence[nn.Module] = ()) -> nn.Module:
        return module

    def prepare(self, accelerator: Any, module: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        model = getattr(getattr(module, "scorer", module), "model", None)
        if accelerator.ddp_handler is None and model is not None and has_unread_parameters(model):
            from accelerate.utils import DistributedDataParallelKwargs

            # an image-text model's vision tower holds layers its features are not read from (LLaVA reads the
            # second-to-last layer): DDP must look for parameters without gradients, as transformers' Trainer
            # does by default
            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        return accelerator.prepare(module, optimizer)

    def no_sync(self, accelerator: Any, module: nn.Module):
        return accelerator.no_sync(module)

    def clip_grad_norm(self, accelerator: Any, params: Sequence[nn.Parameter], max_norm: float) -> float:
        return float(accelerator.clip_grad_norm_(params, max_norm))

    def consolidated(self, accelerator: Any, module: nn.Module) -> nn.Module | None:
        """The plain module to save (on every process; the main process writes it)."""
        return accelerator.unwrap_model(module)


class FullyShard:
    """FSDP2: ``fully_shard`` on each decoder layer, then on the root (the trained module, so its
    forward gathers the embedding, final norm and output layer, which the chunked head reads
    directly). A frozen model (a separate reference) is sharded the same way."""

    name = "fsdp"

    def __init__(self) -> None:
        self._twin: nn.Module | None = None

    def shard(self, module: nn.Module, frozen: Sequence[nn.Module] = ()) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        self._twin = _meta_twin(module)
        for root in (module, *frozen):
            for layer in decoder_layers(root):
                fully_shard(layer)
            fully_shard(root)
        return module

    def prepare(self, accelerator: Any, module: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        return module, optimizer  # sharded already; gradients are reduce-scattered by the hooks

    @contextlib.contextmanager
    def no_sync(self, accelerator: Any, module: nn.Module) -> Iterator[None]:
        """Micro-batches before a step's last one keep their gradients unreduced (as DDP's no_sync)."""
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def clip_grad_norm(self, accelerator: Any, params: Sequence[nn.Parameter], max_norm: float) -> float:
        """The global gradient norm (over every shard), clipped to ``max_norm`` as DDP clips it."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def consolidated(self, accelerator: Any, module: nn.Module) -> nn.Module | None:
        """Every process gathers the full state dict (a collective); the main process gets an
        unsharded copy of ``module`` holding it (others None), to save like a one-process run."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not accelerator.is_main_process:
            return None
        twin = copy.deepcopy(self._twin)
        twin.load_state_dict(full, assign=True)
        # assign=True gives tied parameters (an output layer sharing the input embedding) a tensor each: tie
        # them again, so the directory saved holds them once, as a one-process run's does
        for sub in twin.modules():
            if hasattr(sub, "tie_weights") and hasattr(sub, "config"):
                sub.tie_weights()
                break
        return twin


def save_sharded(directory: Path, module: nn.Module, optimizer: Any) -> None:
    """Each process writes its shards of ``module`` and ``optimizer`` under ``directory/sharded``
    (a collective; ``directory`` is the same path, on a filesystem every process sees)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / SHARDED_DIR))


def load_sharded(directory: Path, module: nn.Module, optimizer: Any) -> None:
    """Restore what :func:`save_sharded` wrote into ``module`` and ``optimizer`` (sharded over any
    number of processes, or not sharded at all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def make_sharding(accelerator: Any) -> Replicated | FullyShard:
    """FSDP2 where the launch asks for FSDP (accelerate's ``ACCELERATE_USE_FSDP``, from ``distributed_type:
    FSDP`` in its config) on more than one process; DDP (or one process) otherwise. DeepSpeed asked for
    on CPU processes, where accelerate cannot run it, is refused in one line."""
    from accelerate.utils import parse_flag_from_env

    many = accelerator.num_processes > 1
    if (many and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
            and accelerator.distributed_type.name != "DEEPSPEED"):
        raise ValueError(f"accelerate was asked for DeepSpeed but runs {accelerator.distributed_type.name} "
                         "here (DeepSpeed needs GPUs and the deepspeed package); launch with "
                         "configs/accelerate/fsdp.yaml (sharded) or ddp.yaml instead")
    if many and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        version = int(os.environ.get("FSDP_VERSION") or 2)
        if version != 2:
            raise ValueError(f"accelerate's config asks for FSDP version {version}; preftune shards with "
                             "FSDP2 (fully_shard): set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        if parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING"):
            raise ValueError("accelerate's config sets fsdp_cpu_ram_efficient_loading: true (weights only on "
                             "the first process); preftune loads them on every process, then shards: set it "
                             "to false")
        return FullyShard()
    return Replicated()
