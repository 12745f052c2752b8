"""Reference log-probs: one method, ``reference(batch) -> SequenceLogps``, three strategies.

* :class:`FrozenReference`: a frozen copy of the initial policy (same dtype), loaded once.
* :class:`AdapterReference`: the LoRA policy with its adapters disabled; no second copy.
* :class:`InitialPolicyReference`: the policy itself before its first update (it *is* the
  reference then); only used to fill a cache, so no second copy is ever loaded.
* :class:`CachedReference`: log-probs precomputed once over the whole dataset and stored on disk
  under a key that hashes the full identity of what produced them (reference weights, model
  config, tokenizer files, tokenized data, budgets, precision). A later run (or a resume) with
  the same key reads the file instead of recomputing. The entry's metadata holds that identity
  and a sha256 of its tensors; an entry that is partial, corrupt or stale is never read: it is
  recomputed (one log line says why). Entries are written to a temporary file and renamed, so
  two runs filling the same key at once each leave a complete entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from preftune.data.batching import ForwardBatch
from preftune.losses.base import SequenceLogps
from preftune.model.hub import resolve_model_path
from preftune.model.logps import SequenceScorer

logger = logging.getLogger("preftune")
CACHE_FORMAT = "preftune-reference-logps/2"
CACHE_TENSORS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")


class Reference(Protocol):
    def __call__(self, batch: ForwardBatch) -> SequenceLogps: ...


class FrozenReference:
    """A frozen model scored under ``torch.no_grad()``."""

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        model.eval().requires_grad_(False)
        self.scorer = SequenceScorer(model, chunk_size)

    def to(self, device: torch.device) -> FrozenReference:
        self.scorer.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: ForwardBatch) -> SequenceLogps:
        return self.scorer(batch)


class AdapterReference:
    """The policy's own base weights: ``with torch.no_grad(), disable_adapter(model)``."""

    def __init__(self, policy: SequenceScorer):
        self.policy = policy

    def __call__(self, batch: ForwardBatch) -> SequenceLogps:
        peft_model = self.policy.model
        with torch.no_grad(), peft_model.disable_adapter():
            return self.policy(batch).detach()


class InitialPolicyReference:
    """The policy before its first optimizer step, scored in eval mode under ``torch.no_grad()``.

    Equal to the reference when the reference is the starting weights (with LoRA too: the adapters
    start at zero, ``B = 0``). Use it only before training starts, e.g. to precompute a cache.
    """

    def __init__(self, policy: SequenceScorer):
        self.policy = policy

    def __call__(self, batch: ForwardBatch) -> SequenceLogps:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                return self.policy(batch)
        finally:
            self.policy.train(was_training)


class CachedReference:
    """Reads precomputed log-probs by dataset position (``batch.indices``)."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, path: Path, reused: bool):
        self.chosen, self.rejected = chosen, rejected
        self.chosen_tokens, self.rejected_tokens = chosen_tokens, rejected_tokens
        self.path, self.reused = path, reused

    def __call__(self, batch: ForwardBatch) -> SequenceLogps:
        idx = batch.indices.cpu()
        device = batch.preference.device
        return SequenceLogps(
            self.chosen[idx].to(device), self.rejected[idx].to(device),
            self.chosen_tokens[idx].to(device), self.rejected_tokens[idx].to(device),
        )


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model_hash: str, data_hash: str, settings: dict) -> str:
    payload = json.dumps({"model": model_hash, "data": data_hash, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def identity_key(identity: dict[str, Any]) -> str:
    """The cache key of a full identity (see :func:`precompute_reference`)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


VOLATILE_CONFIG_KEYS = {"transformers_version", "use_cache", "output_hidden_states", "output_attentions",
                        "return_dict"}


def model_config_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The model config fields that can change scored log-probs (not paths, versions, caching or
    dropout, which is off when scoring)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    values = json.loads(json.dumps(config.to_dict(), default=str))
    return {k: v for k, v in values.items()
            if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS and "dropout" not in k}


TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges",
                           "chat_template")


def tokenizer_fingerprint(name: str | None) -> str:
    """sha256 over the tokenizer files of a model directory (the name itself for a hub id)."""
    path = Path(resolve_model_path(name))
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(str(name).encode())
        return h.hexdigest()
    for f in sorted(path.iterdir()):
        tokenizer_file = f.name.startswith(TOKENIZER_FILE_PREFIXES) or f.suffix in (".model", ".tiktoken")
        if f.is_file() and tokenizer_file:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, by name."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_cache_entry(path: Path, identity: dict[str, Any],
                     num_pairs: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(tensors, "") when ``path`` holds a complete entry of exactly ``identity``, else (None, why);
    ``why`` is empty when there is no entry."""
    if not path.exists():
        return None, ""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - a truncated or garbled file fails in safetensors' parser
        return None, f"unreadable, partial or garbled ({type(e).__name__}: {e})"
    if metadata.get("format") != CACHE_FORMAT:
        return None, "written by an older preftune, without a checksum"
    stored = json.loads(metadata.get("identity", "{}"))
    if stored != identity:
        changed = sorted(k for k in stored.keys() | identity.keys() if stored.get(k) != identity.get(k))
        return None, f"stale: made with another {', '.join(changed)}"
    if sorted(tensors) != sorted(CACHE_TENSORS) or any(t.shape != (num_pairs,) for t in tensors.values()):
        return None, f"holds other tensors than {num_pairs} values each of {', '.join(CACHE_TENSORS)}"
    if tensors_checksum(tensors) != metadata.get("checksum"):
        return None, "corrupt: its values do not match their checksum"
    return tensors, ""


def _remove_old_temporaries(directory: Path, max_age_s: float = 3600.0) -> None:
    """Temporary files of writers killed mid-write (a live writer's file is seconds old)."""
    for f in directory.glob(".tmp-ref-*"):
        try:
            if time.time() - f.stat().st_mtime > max_age_s:
                f.unlink()
        except OSError:
            pass  # another process removed it first


@dataclass(frozen=True)
class Shares:
    """How the processes of a run split a precompute: each scores the batches it is given, ``combine``
    joins the processes' values (a collective), ``any_true`` tells every process whether any process
    said true (all compute when any lacks the entry), and only the process that ``writes`` writes it.
    The default is one process doing everything."""

    combine: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda tensors: tensors
    any_true: Callable[[bool], bool] = bool
    writes: bool = True


def precompute_reference(
    reference: Reference,
    batches: Iterable[ForwardBatch],
    num_pairs: int,
    cache_dir: str | Path,
    key: str,
    on_compute: Callable[[], None] | None = None,
    identity: dict[str, Any] | None = None,
    shares: Shares = Shares(),  # noqa: B008 - frozen, never mutated
) -> CachedReference:
    """Read ``cache_dir/ref-<key>.safetensors`` if it holds a verified entry of ``identity``, else
    compute it over ``batches`` (this process's; together they cover dataset positions
    ``0..num_pairs-1``, see :class:`Shares`) and write it atomically with ``identity`` and a checksum
    in its metadata."""
    identity = identity if identity is not None else {"key": key}
    path = Path(cache_dir) / f"ref-{key}.safetensors"
    tensors, why = read_cache_entry(path, identity, num_pairs)
    if not shares.any_true(tensors is None):
        return CachedReference(*(tensors[k] for k in CACHE_TENSORS), path, True)
    if why:
        logger.warning("reference cache %s: %s; recomputing it", path, why)
    if on_compute is not None:
        on_compute()
    out = {k: torch.zeros(num_pairs) for k in CACHE_TENSORS}
    scored = torch.zeros(num_pairs)
    for batch in batches:
        logps = reference(batch)
        idx = batch.indices.cpu()
        out["chosen"][idx] = logps.chosen.float().cpu()
        out["rejected"][idx] = logps.rejected.float().cpu()
        out["chosen_tokens"][idx] = logps.chosen_tokens.float().cpu()
        out["rejected_tokens"][idx] = logps.rejected_tokens.float().cpu()
        scored[idx] += 1
    # each position scored by one process, zero on the others: their sum is its value, exactly
    out = shares.combine({**out, "scored": scored})
    if not bool((out.pop("scored") == 1).all()):
        raise RuntimeError("reference precompute did not score every pair exactly once")
    error: Exception | None = None
    if shares.writes:
        try:
            _write_entry(path, out, identity, key)
        except Exception as e:  # noqa: BLE001 - a full disk and the like: every process stops, not only this one
            error = e
    if shares.any_true(error is not None):
        raise error or RuntimeError(f"the reference cache {path} could not be written by the main process")
    return CachedReference(*(out[k] for k in CACHE_TENSORS), path, False)


def _write_entry(path: Path, out: dict[str, torch.Tensor], identity: dict[str, Any], key: str) -> None:
    """``out`` into ``path`` atomically, with ``identity`` and the values' checksum in its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_old_temporaries(path.parent)
    metadata = {"format": CACHE_FORMAT, "identity": json.dumps(identity, sort_keys=True),
                "checksum": tensors_checksum(out)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-ref-{key}-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(out, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: a reader sees no entry or a whole one, never a partial one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

