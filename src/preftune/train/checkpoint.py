"""Atomic checkpoints: write everything into a temporary directory, then rename it into place.

A checkpoint ``checkpoint-<step>/`` holds the model (``save_pretrained``, safetensors; the LoRA
adapter when used), the tokenizer, ``optimizer.pt`` / ``scheduler.pt`` (state dicts, read back
with ``torch.load(weights_only=True)``), ``rng.pt`` and ``trainer_state.json`` (step, data position).
A crash mid-write leaves only a ``.tmp-*`` directory, which is ignored and cleaned up later.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_dir)`` and rename ``tmp_dir`` to ``target`` (replacing an old one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """``extra``: the step source's state (e.g. PPO's rollout buffer), as ``steps_state.pt``."""

    def fill(tmp: Path) -> None:
        save_model(tmp)
        if extra is not None:
            torch.save(extra, tmp / "steps_state.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    return write_atomically(output_dir / f"checkpoint-{step}", fill)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


def load_training_state(
    path: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from ``path``; return trainer_state.json."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    return json.loads((path / "trainer_state.json").read_text())


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints (all when None)."""
    if keep is None:
        return
    found = sorted(
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))
    )
    for _, p in found[:-keep] if keep > 0 else found:
        shutil.rmtree(p, ignore_errors=True)
