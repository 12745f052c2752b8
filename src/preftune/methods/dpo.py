"""DPO (and every registered preference loss): config, objective, ``train_dpo``.

setup -> train -> cleanup, linearly:

    config -> tokenizer, data -> policy -> reference (frozen | adapter | precomputed | none)
           -> DPOObjective -> Trainer.fit() -> final model, metrics.jsonl
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn
from torch.profiler import record_function

from preftune.data.batching import ForwardBatch
from preftune.data.tokenize import TokenizedData
from preftune.engine.accelerator import autocast
from preftune.engine.config import TrainConfig, load_config
from preftune.engine.faults import any_process
from preftune.engine.loop import StepOutput, Trainer, TrainResult
from preftune.engine.model_card import MethodCard
from preftune.engine.setup import (
    CausalLMCheckpoints,
    Collate,
    DataBundle,
    load_frozen,
    load_policy_scorer,
    prepare_run,
)
from preftune.engine.sharding import make_sharding
from preftune.engine.steps import step_plan
from preftune.losses import LossInputs, PreferenceLoss, SequenceLogps
from preftune.losses.metrics import preference_metrics, unpaired_derived, unpaired_metrics
from preftune.methods import CITATIONS
from preftune.model.logps import SequenceScorer
from preftune.model.reference import (
    AdapterReference,
    CachedReference,
    FrozenReference,
    InitialPolicyReference,
    Reference,
    Shares,
    identity_key,
    model_config_fingerprint,
    model_fingerprint,
    precompute_reference,
    tokenizer_fingerprint,
)

logger = logging.getLogger("preftune")
REFERENCE_MODES = ("auto", "model", "adapter", "precomputed")


def default_cache_dir() -> str:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "preftune", "reference_logps")


@dataclass
class DPOConfig(TrainConfig):
    """DPO run settings: :class:`TrainConfig` plus the objective and the reference.

    loss: a registered loss name or ``{name: weight}`` (e.g. ``{sigmoid: 1.0, sft: 0.2}``).
    loss_params: hyperparameters by name (``beta``, ``label_smoothing``, ...), shared by the losses.
    reference: ``precomputed`` (log-probs computed once before training, by the starting policy
      itself unless ``reference_model`` names other weights, and cached on disk under
      ``reference_cache_dir``, default ``~/.cache/preftune/reference_logps``, for later runs),
      ``model`` (a frozen copy scored every step), ``adapter`` (LoRA only: the policy with its
      adapters off) or ``auto``: ``precomputed`` when the run sees every training pair at least
      once, else ``adapter`` with LoRA and ``model`` without. Reference-free losses (SimPO, ORPO,
      SFT) load none; naming a reference for them is an error.
    reference_model: the reference's weights (default: ``model``).
    """

    loss: str | dict[str, float] = "sigmoid"
    loss_params: dict[str, Any] = field(default_factory=dict)
    reference: str = "auto"
    reference_model: str | None = None
    reference_cache_dir: str | None = None
    # the loss :attr:`objective` last built (no annotation: not a field, not in the run's identity)
    _built_objective = None

    @property
    def objective(self) -> PreferenceLoss:
        """``loss`` with ``loss_params`` as a :class:`PreferenceLoss`: built (checked and dry-run) once,
        by :meth:`validate`, and again only after ``loss`` or ``loss_params`` changed."""
        weights, params = self.weighted_losses(), dict(self.loss_params)
        built = self._built_objective
        if built is None or list(built.weights.items()) != list(weights.items()) or built.params != params:
            built = self._built_objective = PreferenceLoss(weights, params)
        return built

    def weighted_losses(self) -> dict[str, float]:
        """``loss`` as ``{name: weight}`` (a name alone weighs 1), in the order given."""
        return {self.loss: 1.0} if isinstance(self.loss, str) else dict(self.loss)

    def reference_mode(self, num_train_pairs: int, num_processes: int = 1) -> str:
        """The resolved mode: 'none', 'model', 'adapter' or 'precomputed'.

        ``auto`` precomputes when the run's optimizer steps cover the training set at least once
        (then the pass costs what scoring every step would, and it is paid once across runs);
        a run over a small part of a large set scores its batches as it goes instead.
        """
        if not self.objective.needs_reference:
            return "none"
        if self.reference != "auto":
            return self.reference
        global_batch, steps = step_plan(self, num_train_pairs, num_processes)
        if steps * global_batch >= num_train_pairs:
            return "precomputed"
        return "adapter" if self.lora else "model"

    def validate(self) -> None:
        super().validate()
        objective = self.objective  # raises on unknown losses / parameters
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"config: reference must be one of {', '.join(REFERENCE_MODES)}, "
                             f"got {self.reference!r}")
        if not objective.needs_reference and (self.reference != "auto" or self.reference_model):
            raise ValueError(f"config: loss {self.loss!r} uses no reference model; "
                             "remove 'reference'/'reference_model'")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("config: reference 'adapter' needs lora: true")
        if self.reference == "adapter" and self.reference_model:
            raise ValueError("config: reference_model cannot be used with the adapter reference "
                             "(it is the base model)")
        if self.reference_cache_dir and self.reference not in ("auto", "precomputed"):
            raise ValueError("config: reference_cache_dir is only used with reference: precomputed (or auto)")


class DPOObjective(CausalLMCheckpoints):
    """Per-pair loss of any registered preference objective; ``module`` is the policy scorer."""

    def __init__(self, policy: SequenceScorer, reference: Reference | None, loss: PreferenceLoss,
                 tokenizer: Any):
        self.module, self.reference, self.loss_fn, self.tokenizer = policy, reference, loss, tokenizer

    def loss(self, batch: ForwardBatch) -> StepOutput:
        policy_logps = self.module(batch)
        with record_function("preftune: reference"):
            reference = self.reference(batch) if self.reference is not None else None
        out = self.loss_fn(LossInputs(policy_logps, reference, batch.preference))
        if self.loss_fn.data_kind == "unpaired":
            return StepOutput(out.loss, unpaired_metrics(out, policy_logps, batch.preference))
        first_loss = next(iter(self.loss_fn.weights))
        return StepOutput(out.loss, preference_metrics(out, policy_logps, first_loss=first_loss))

    def derived_metrics(self, row: dict[str, float]) -> dict[str, float]:
        """KTO's per-class means from the row's sums and counts (exact over the logged window)."""
        return unpaired_derived(row) if self.loss_fn.data_kind == "unpaired" else {}

    def frozen_modules(self) -> list[nn.Module]:
        """The scorer of a separate frozen reference model (sharded with the policy under FSDP)."""
        return [self.reference.scorer] if isinstance(self.reference, FrozenReference) else []


@dataclass
class DPORun:
    """What ``train_dpo`` returns: the loop's result plus what happened on the way."""

    train: TrainResult
    data: DataBundle
    reference_mode: str
    reference_cache: Path | None = None
    reference_cache_reused: bool | None = None


def build_reference(config: DPOConfig, mode: str, policy: SequenceScorer, data: DataBundle, collate: Collate,
                    accelerator: Accelerator) -> Reference | None:
    """The reference of ``mode`` (None for ``none``); ``precomputed``: its log-probs over train + eval
    pairs, from the cache or computed now (by the main process first)."""
    if mode == "none":
        return None
    if mode == "adapter":
        return AdapterReference(policy)
    if mode == "model" or config.reference_model:
        # a frozen model is prepared by the run's own engine for inference, as accelerate documents it
        # (evaluation_mode: placement and precision, no DDP/FSDP/DeepSpeed training wrapper, no optimizer)
        weights = load_frozen(config.reference_model or config.model, config).eval().requires_grad_(False)
        if make_sharding(accelerator).name != "fsdp":  # sharded, it is sharded with the policy (the Trainer)
            weights = accelerator.prepare_model(weights, evaluation_mode=True)
        frozen = FrozenReference(weights, config.logit_chunk_size).to(accelerator.device)
        if mode == "model":
            return frozen
        scorer, weights = frozen, frozen.scorer.model
    else:  # the reference is the starting policy: score with it before its first update
        scorer, weights = InitialPolicyReference(policy.to(accelerator.device)), policy.model
    # precomputed: one cache over train + eval pairs (eval positions follow the train ones)
    pairs = TokenizedData(data.train.pairs + (data.eval.pairs if data.eval else []))
    # the entry's identity: everything that makes these numbers (checked on every read)
    identity = {"weights": model_fingerprint(weights), "model_config": model_config_fingerprint(weights),
                "tokenizer": tokenizer_fingerprint(config.tokenizer or config.model),
                "data": pairs.fingerprint(),
                "budgets": {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
                            "max_completion_length": config.max_completion_length},
                "precision": config.precision}
    key = identity_key(identity)
    size, count = config.batch_size, len(pairs.pairs)
    world, rank = accelerator.num_processes, accelerator.process_index
    # micro-batch k is scored by process k mod N: the batches (and so the values) are those of one process
    starts = list(range(0, count, size))[rank::world]
    batches = (collate(pairs.pairs[i : i + size], range(i, min(i + size, count))).to(accelerator.device)
               for i in starts)

    def score(batch: ForwardBatch) -> SequenceLogps:
        with autocast(config, accelerator.device):
            return scorer(batch)

    def combine(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: accelerator.reduce(v.to(accelerator.device), "sum").cpu() for k, v in tensors.items()}

    shares = (Shares(combine, lambda flag: any_process(accelerator, flag), accelerator.is_main_process)
              if world > 1 else Shares())
    note = f" ({len(starts)} of {-(-count // size)} batches on each process)" if world > 1 else ""
    cache_dir = config.reference_cache_dir or default_cache_dir()
    return precompute_reference(score, batches, count, cache_dir, key, identity=identity, shares=shares,
                                on_compute=lambda: logger.info("reference: precomputing log-probs%s", note))


def reference_reason(config: DPOConfig, mode: str, num_train_pairs: int, num_processes: int) -> str:
    """The resolved reference mode and why, in one line (the start-of-run summary's)."""
    what = {"none": "none", "model": "model (a frozen copy scored every step)",
            "adapter": "adapter (the policy with its LoRA adapters off)",
            "precomputed": "precomputed (log-probs computed once before training, cached)"}[mode]
    if mode == "none":
        return f"none: loss {config.loss!r} uses no reference model"
    if config.reference != "auto":
        return f"{what}: as configured"
    per_step, steps = step_plan(config, num_train_pairs, num_processes)
    seen = f"{steps} steps x {per_step} pairs"
    if mode == "precomputed":
        return f"auto -> {what}: {seen} cover all {num_train_pairs} training pairs"
    return f"auto -> {what}: {seen} see only part of the {num_train_pairs} training pairs"


def _describe_loss(config: DPOConfig) -> str:
    """The summary's loss: ``sigmoid + 0.2 x sft (beta=0.1)``."""
    weights = config.weighted_losses()
    terms = " + ".join(name if w == 1.0 else f"{w:g} x {name}" for name, w in weights.items())
    params = ", ".join(f"{k}={v}" for k, v in config.loss_params.items())
    return terms + (f" ({params})" if config.loss_params else "")


def train_dpo(config: DPOConfig | dict[str, Any], *, callbacks=(),
              accelerator: Accelerator | None = None) -> DPORun:
    """Train a policy with DPO (or any registered preference loss). See :class:`DPOConfig`."""
    if isinstance(config, dict):
        from preftune.engine.config import build_config

        config = build_config(DPOConfig, config)
    setup = prepare_run(config, accelerator, kind=config.objective.data_kind)
    data, accelerator = setup.data, setup.accelerator
    policy = load_policy_scorer(config)
    mode = config.reference_mode(len(data.train.pairs), accelerator.num_processes)
    why = reference_reason(config, mode, len(data.train.pairs), accelerator.num_processes)
    if accelerator.is_main_process:
        logger.info("reference: %s", why)
    reference = build_reference(config, mode, policy, data, setup.collate, accelerator)
    objective = DPOObjective(policy, reference, config.objective, setup.saved_with)
    # eval pairs follow the train pairs in the reference cache
    steps, evaluation = setup.dataset_steps(noun="pairs" if data.kind == "paired" else "examples",
                                            eval_after_train=True)
    card = MethodCard(f"preference tuning, loss {_describe_loss(config)}", "dpo",
                      ("dpo", *config.weighted_losses()), CITATIONS["dpo"])
    trainer = Trainer(config, objective, steps, evaluation=evaluation, accelerator=accelerator,
                      callbacks=callbacks, summary=[f"loss: {_describe_loss(config)}"], card=card)
    run = DPORun(trainer.fit(), data, mode)
    if isinstance(reference, CachedReference):
        run.reference_cache, run.reference_cache_reused = reference.path, reference.reused
    return run


def load_dpo_config(path: str | None, overrides: list[str] | None = None) -> DPOConfig:
    return load_config(DPOConfig, path, overrides)
