"""Atomic checkpoints: write everything into a temporary directory, then rename it into place.

A checkpoint ``checkpoint-<step>/`` holds the model (``save_pretrained``, safetensors; the LoRA
adapter when used), the tokenizer, ``optimizer.pt`` / ``scheduler.pt`` (state dicts, read back
with ``torch.load(weights_only=True)``), ``rng.pt``, ``trainer_state.json`` (step, the run's
identity, the logging window) and, written last, ``manifest.json``: the size and sha256 of every
other file. A checkpoint is used only when its manifest verifies (:func:`find_checkpoint` falls back
to the newest one that does). A crash mid-write leaves only a ``.tmp-*`` directory (or, while a
directory is replaced, an ``.old-*`` one); :func:`clean_leftovers` removes or restores them.
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"


class CheckpointWriteError(OSError):
    """A checkpoint (or the final model) could not be written, e.g. the disk is full; the message
    names the last good checkpoint, which the failed write left untouched."""


def temporary_dir(target: Path) -> Path:
    """A fresh ``.tmp-<name>-*`` directory beside ``target``, for :func:`write_atomically` to fill."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))


def write_atomically(target: Path, fill: Callable[[Path], None], *, into: Path | None = None) -> Path:
    """Call ``fill(tmp_dir)`` and rename ``tmp_dir`` to ``target`` (replacing an old one). ``into``: a
    :func:`temporary_dir` already holding part of it (a sharded checkpoint's shards, written by every
    process), completed by ``fill``."""
    tmp = into if into is not None else temporary_dir(target)
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
    save_model: Callable[[Path], None] | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    into: Path | None = None,
) -> Path:
    """``extra``: the step source's state (e.g. PPO's rollout buffer), as ``steps_state.pt``.
    ``save_model`` and ``optimizer`` None: a sharded run wrote both into ``into`` already
    (``engine/sharding.py``)."""

    def fill(tmp: Path) -> None:
        if save_model is not None:
            save_model(tmp)
        if extra is not None:
            torch.save(extra, tmp / "steps_state.pt")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        write_manifest(tmp)

    return write_atomically(output_dir / f"checkpoint-{step}", fill, into=into)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: size and sha256 of every file under ``directory`` (written last)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in files}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be used (missing, truncated or altered files), or None."""
    try:
        entries = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by an older preftune)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= e.keys()
                                                for e in entries.values()):
        return f"garbled {MANIFEST}"
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng.pt"):
        if name not in entries:
            return f"{name} missing"
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, {entry['size']} were written"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except ValueError as e:
        return f"unreadable trainer_state.json ({e})"
    if state.get("step") != checkpoint_step(path):
        return f"trainer_state.json says step {state.get('step')}"
    return None


def checkpoint_step(path: Path) -> int:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory, oldest first."""
    if not output_dir.is_dir():
        return []
    found = (p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir())
    return sorted(found, key=checkpoint_step)


def find_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that verifies or None, [(newer unusable checkpoint, why)])."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that verifies, or None."""
    return find_checkpoint(output_dir)[0]


def clean_leftovers(output_dir: Path) -> list[str]:
    """Remove ``.tmp-*`` directories of interrupted writes; an ``.old-<name>`` whose ``<name>`` is
    missing (a crash between the two renames of :func:`write_atomically`) is put back, else removed.
    Returns what was done, one line each."""
    done: list[str] = []
    if not output_dir.is_dir():
        return done
    for p in sorted(output_dir.iterdir()):
        if p.name.startswith(".tmp-"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            done.append(f"removed {p.name} (an interrupted write)")
        elif p.name.startswith(".old-") and p.is_dir():
            target = p.with_name(p.name[len(".old-"):])
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}")
            else:
                os.replace(p, target)
                done.append(f"restored {target.name} from {p.name} (a replacement was interrupted)")
    return done


def load_training_state(
    path: Path, optimizer: torch.optim.Optimizer | None, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    """Restore optimizer (unless None: a sharded checkpoint's is restored with its shards), scheduler
    and RNG from ``path``; return trainer_state.json."""
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    return json.loads((path / "trainer_state.json").read_text())


def remove_dir(path: Path) -> None:
    """Rename ``path`` to a ``.tmp-*`` name (atomic), then delete it: a crash midway leaves no
    half-deleted checkpoint that looks like a real one, only a leftover that is cleaned later."""
    doomed = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints (all when None)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for p in found[:-keep] if keep > 0 else found:
        remove_dir(p)
