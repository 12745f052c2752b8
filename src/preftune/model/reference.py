"""Reference log-probs: one method, ``reference(batch) -> SequenceLogps``, three strategies.

* :class:`FrozenReference`: a frozen copy of the initial policy (same dtype), loaded once.
* :class:`AdapterReference`: the LoRA policy with its adapters disabled; no second copy.
* :class:`InitialPolicyReference`: the policy itself before its first update (it *is* the
  reference then); only used to fill a cache, so no second copy is ever loaded.
* :class:`CachedReference`: log-probs precomputed once over the whole dataset and stored on disk
  under a key that hashes the reference weights, the tokenized data and the precision. A later
  run (or a resume) with the same key reads the file instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from preftune.data.batching import ForwardBatch
from preftune.losses.base import SequenceLogps
from preftune.model.logps import SequenceScorer


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


def precompute_reference(
    reference: Reference,
    batches: Iterable[ForwardBatch],
    num_pairs: int,
    cache_dir: str | Path,
    key: str,
    on_compute: Callable[[], None] | None = None,
) -> CachedReference:
    """Load ``cache_dir/ref-<key>.safetensors`` if present, else compute it over ``batches``
    (which must cover dataset positions ``0..num_pairs-1``) and write it atomically."""
    path = Path(cache_dir) / f"ref-{key}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return CachedReference(t["chosen"], t["rejected"], t["chosen_tokens"], t["rejected_tokens"], path, True)
    if on_compute is not None:
        on_compute()
    out = {k: torch.full((num_pairs,), float("nan")) for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    for batch in batches:
        logps = reference(batch)
        idx = batch.indices.cpu()
        out["chosen"][idx] = logps.chosen.float().cpu()
        out["rejected"][idx] = logps.rejected.float().cpu()
        out["chosen_tokens"][idx] = logps.chosen_tokens.float().cpu()
        out["rejected_tokens"][idx] = logps.rejected_tokens.float().cpu()
    if torch.isnan(out["chosen"]).any():
        raise RuntimeError("reference precompute did not cover every pair")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-ref-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(out, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return CachedReference(out["chosen"], out["rejected"], out["chosen_tokens"], out["rejected_tokens"], path, False)
