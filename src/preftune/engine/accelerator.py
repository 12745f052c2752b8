"""The accelerate side of a run: the ``Accelerator`` (processes, devices, DDP; sharding is
``sharding.py``'s), the training device, bf16 autocast, and "the local main process first" for work
one process per machine does (tokenizing into the cache) while the others wait."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from preftune.engine.config import TrainConfig


def autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast when ``precision: bf16`` (weights and optimizer state stay fp32), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def make_accelerator(config: TrainConfig):
    """The ``Accelerator``; precision comes from the preftune config (autocast), not from accelerate."""
    from accelerate import Accelerator

    # cpu=True on machines without an accelerator lets `torchrun`/`accelerate launch` run gloo processes
    accelerator = Accelerator(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    # FSDP is applied by preftune itself (engine/sharding.py), on CPU processes too;
    # DeepSpeed is checked there
    if accelerator.mixed_precision not in ("no", config.precision.replace("fp32", "no")):
        raise ValueError(
            f"accelerate is configured for mixed precision {accelerator.mixed_precision!r} but the config "
            f"says precision: {config.precision}; set precision in the preftune config only"
        )
    return accelerator


def training_device() -> torch.device:
    """The device training will run on (the model moves there in accelerate.prepare)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def local_main_process_first():
    """accelerate's ``local_main_process_first`` under several processes, else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from accelerate import PartialState

        return PartialState().local_main_process_first()
    return contextlib.nullcontext()


class LaunchedProcesses:
    """The processes of a run launched with ``torchrun`` / ``accelerate launch`` (one otherwise): this
    one's index, their count, whether it is the main one (it writes shared files) and a barrier."""

    def __init__(self) -> None:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # joins the launch's process group
        self.index, self.count, self.main = state.process_index, state.num_processes, state.is_main_process
        self.wait = state.wait_for_everyone


def all_shares(share: list[Any], error: Exception | None = None) -> list[Any]:
    """Every process's ``share`` of some work (e.g. the samples it drew and judged), concatenated in
    process order, on every process (``torch.distributed.all_gather_object``; one process: ``share``).
    ``error``: this process's share failed; it is raised here, and every other process raises too
    (naming it), instead of waiting for a share that never comes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return share
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (share, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failed = [message for _, message in gathered if message]
    if failed:
        raise RuntimeError(f"another process of the run failed: {failed[0]}")
    return [item for part, _ in gathered for item in part]
