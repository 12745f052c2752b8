"""One training loop for every objective (DPO and its family, reward models, SFT, PPO).

The loop knows a step source (which micro-batches make optimizer step ``s``), the objective's
``loss(batch) -> StepOutput`` and nothing about any loss. Each item of a batch weighs ``units``
(1 per pair for preference losses, its scored tokens for SFT and PPO), and a step's gradient is
the mean over the step's units: each micro-batch adds ``sum(per_item_loss) / units_in_step``, so
gradient accumulation equals one big batch. It runs under ``accelerate`` (``accelerate launch``,
``torchrun``: DDP), or sharded with FSDP2 where the launch asks for FSDP
(:mod:`preftune.engine.sharding`). Faults (another run in the output directory, a resume of a
different run, non-finite steps, SIGINT/SIGTERM, a failed checkpoint write) are handled as
:mod:`preftune.engine.faults` describes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.profiler import record_function

from preftune.data.batching import ForwardBatch
from preftune.engine import faults
from preftune.engine.accelerator import autocast, make_accelerator
from preftune.engine.checkpoint import (
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
    temporary_dir,
    write_atomically,
)
from preftune.engine.config import TrainConfig
from preftune.engine.diagnostics import Diagnostics
from preftune.engine.metrics_log import MetricsLog, MetricsWindow
from preftune.engine.model_card import MethodCard, write_model_card
from preftune.engine.optimizer import OptimizerInBackward, make_optimizer, make_scheduler
from preftune.engine.progress import progress, start_summary
from preftune.engine.sharding import SHARDED_DIR, load_sharded, make_sharding, save_sharded
from preftune.engine.steps import DatasetSteps, StepSource

logger = logging.getLogger("preftune")


@dataclass(frozen=True)
class StepOutput:
    """``loss``: ``[B]`` per-pair losses (differentiable); ``metrics``: name -> ``[B]`` detached
    values."""

    loss: Tensor
    metrics: dict[str, Tensor]


class Objective(Protocol):
    """What the loop trains: a module, a per-item loss, derived metrics, and how to save the result."""

    module: nn.Module

    def loss(self, batch: ForwardBatch) -> StepOutput: ...

    def derived_metrics(self, row: dict[str, float]) -> dict[str, float]:
        """Metrics computed from a logged row (training or ``eval/``), added to it (e.g. SFT's
        ``perplexity = exp(loss)``); ``{}`` for none."""
        ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def frozen_modules(self) -> list[nn.Module]:
        """Modules the loss runs without gradient that must follow the policy's placement (a separate
        reference model: sharded with the policy under FSDP); ``[]`` for none."""
        ...


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None
    warnings: list[Any] = field(default_factory=list)  # diagnostics.Diagnosis, in the order they fired
    # real tokens through forward + backward passes (all processes) in this process's steps
    train_tokens: int = 0


@dataclass
class _Run:
    """What :meth:`Trainer.fit` carries from one optimizer step to the next."""

    model: nn.Module  # the objective's module as given (what the final write checks for finite weights)
    prepared: nn.Module  # the same, as ``accelerator.prepare`` wrapped it
    params: list[nn.Parameter]  # the trainable ones, for the gradient norm
    optimizer: Any
    scheduler: Any
    in_backward: OptimizerInBackward | None  # the optimizer again, where its updates run in backward
    result: TrainResult
    window: MetricsWindow
    bad: faults.BadSteps
    bar: Any  # tqdm or progress.LogProgress
    log: MetricsLog


class Trainer:
    """``Trainer(config, objective, steps).fit()``; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        objective: Objective,
        steps: StepSource,
        *,
        evaluation: DatasetSteps | None = None,
        accelerator: Accelerator | None = None,
        callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
        summary: Sequence[str] = (),
        card: MethodCard | None = None,
    ):
        self.config, self.objective, self.steps, self.evaluation = config, objective, steps, evaluation
        # the objective's lines of the start-of-run summary (e.g. the reference)
        self.summary = list(summary)
        # what final/README.md says of the method (default: the config class's name)
        self.card = card or MethodCard(type(config).__name__.removesuffix("Config"), "dpo")
        self.accelerator = accelerator or make_accelerator(config)
        self.sharding = make_sharding(self.accelerator)  # DDP, or FSDP2 where the launch asks for FSDP
        self.callbacks = callbacks
        self.diagnostics = Diagnostics()
        self.output_dir = Path(config.output_dir)
        self.total_steps = steps.total_steps(self.accelerator.num_processes)
        self.identity = faults.RunIdentity.of(config, steps.fingerprint(), self.accelerator.num_processes)

    # -- one optimizer step -------------------------------------------------------------
    def _train_step(self, module: nn.Module, step: int) -> tuple[dict[str, float], int]:
        """Forward/backward over the step's micro-batches. Each adds sum(loss) * world / units_in_step,
        so after DDP averages gradients over processes the step's gradient is the mean over all
        units."""
        acc = self.accelerator
        plan = self.steps.step(step, acc.process_index, acc.num_processes)
        sums: dict[str, float] = {}
        tokens = 0
        for i, batch in enumerate(plan.batches):
            batch = batch.to(acc.device)
            sync = i == len(plan.batches) - 1
            with nullcontext() if sync else self.sharding.no_sync(acc, module), \
                    autocast(self.config, acc.device), record_function("preftune: forward+backward"):
                out = self.objective.loss(batch)
                acc.backward(out.loss.sum() * acc.num_processes / plan.units)
            _accumulate(sums, out)
            tokens += batch.num_real_tokens
        if plan.units <= 0:  # a step source's contract: every step trains on something
            raise RuntimeError(f"step {step + 1}: the step source gave nothing to train on")
        sums["_tokens"] = float(tokens)
        sums = _sum_over_processes(acc, sums)
        tokens = int(sums.pop("_tokens"))
        return {**{k: v / plan.units for k, v in sums.items()}, **plan.metrics}, tokens

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics per unit over the evaluation data (in order, no gradient)."""
        if self.evaluation is None:
            return {}
        self.objective.module.eval()
        sums: dict[str, float] = {}
        units = 0.0
        for batch, batch_units in self.evaluation.in_order(self.config.eval_batch_size):
            with autocast(self.config, self.accelerator.device):
                _accumulate(sums, self.objective.loss(batch.to(self.accelerator.device)))
            units += batch_units
        self.objective.module.train()
        return {f"eval/{k}": v / max(units, 1e-12) for k, v in sums.items()}

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train from step 0, or from the checkpoint a resume finds, to :attr:`total_steps`; write
        ``final`` (with ``save_final``)."""
        run, start = self._start()
        hooks = closing(run.in_backward) if run.in_backward else nullcontext()  # removed when the run ends
        with faults.StopSignals() as stop, run.log, closing(run.bar), hooks:
            if self.evaluation is not None and self.config.eval_on_start and start == 0:
                # the baseline: the starting model on held-out data
                self._evaluate_and_log(0, run.result, run.log)
            for step in range(start, self.total_steps):
                self._fit_step(run, step, stop)
            run.log.plots(self.total_steps)
        if self.config.save_final:
            plain = self.sharding.consolidated(self.accelerator, run.prepared)  # a collective when sharded

            def final() -> Path:
                return write_atomically(self.output_dir / "final", lambda d: self._save_final(d, plain, run))

            final_dir = faults.guarded_write(self.accelerator, self.output_dir, "final", self.total_steps,
                                             run.model, final)
            run.result.final_dir = final_dir if self.accelerator.is_main_process else None
        self.objective.module = self.accelerator.unwrap_model(run.prepared)
        return run.result

    def _start(self) -> tuple[_Run, int]:
        """The optimizer and schedule, the output directory (and the checkpoint a resume continues
        from), the prepared module, logs and progress; (the run, its first step)."""
        cfg, acc = self.config, self.accelerator
        torch.manual_seed(cfg.seed)
        module = self.objective.module
        if cfg.optimizer_in_backward and acc.num_processes > 1:
            raise ValueError("config: optimizer_in_backward updates each tensor before processes could "
                             "average its gradient: train on one process, or set it to false")
        plan = faults.prepare_output_dir(acc, self.output_dir, cfg, self.identity)
        # sharded before the optimizer is made: it holds (and steps) each process's shards
        self.sharding.shard(module, frozen=self.objective.frozen_modules())
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        in_backward = optimizer if isinstance(optimizer, OptimizerInBackward) else None
        scheduler = make_scheduler(cfg, optimizer, self.total_steps)
        state = self._resume(plan.checkpoint, optimizer, scheduler) if plan.checkpoint is not None else {}
        start = state.get("step", 0)
        if start > self.total_steps:  # a shorter run resumed: nothing to train, and no final to write
            raise ValueError(f"resume: {plan.checkpoint.name} is at step {start}, past this run's "
                             f"{self.total_steps} steps; raise max_steps (or epochs) to at least {start}")
        prepared, optimizer = self.sharding.prepare(acc, module, optimizer)
        self.objective.module = prepared
        prepared.train()
        bad = faults.BadSteps(cfg.max_bad_steps, state.get("bad_steps"))
        bad.last_checkpoint = plan.checkpoint
        run = _Run(module, prepared, params, optimizer, scheduler, in_backward,
                   TrainResult(self.output_dir, self.total_steps),
                   MetricsWindow(**state.get("window", {})), bad,
                   progress(cfg, acc.is_main_process, start, self.total_steps),
                   MetricsLog(self.output_dir, cfg, acc.is_main_process, start))
        if acc.is_main_process and self.sharding.name == "fsdp":
            logger.info("sharding: FSDP2 over %d processes (fully_shard per decoder layer and at the root)",
                        acc.num_processes)
        if acc.is_main_process:
            for line in [*self.summary, *start_summary(cfg, self.steps.num_items, acc.num_processes,
                                                       self.total_steps, self.steps.noun)]:
                logger.info(line)
        return run, start

    def _fit_step(self, run: _Run, step: int, stop: faults.StopSignals) -> None:
        """Optimizer step ``step``: train, apply (unless non-finite), log, evaluate, checkpoint as
        configured; after a stop signal, a checkpoint and :class:`faults.TrainingInterrupted`."""
        cfg, acc = self.config, self.accelerator
        metrics, tokens = self._train_step(run.prepared, step)
        run.result.train_tokens += tokens
        grad_norm = (run.in_backward.grad_norm() if run.in_backward is not None  # its updates ran in backward
                     else self.sharding.clip_grad_norm(acc, run.params, cfg.max_grad_norm or float("inf")))
        done = step + 1
        if run.bad.ok(done, metrics["loss"], grad_norm):  # else skipped: nothing non-finite is applied
            with record_function("preftune: optimizer step"):
                run.optimizer.step()
            run.window.add(metrics, tokens)
        run.scheduler.step()  # after a skipped step too: step s always has the learning rate of step s
        run.optimizer.zero_grad(set_to_none=True)
        if done % cfg.logging_steps == 0 or done == self.total_steps:
            self._log_row(run, done, grad_norm)
        at_eval_step = bool(cfg.eval_steps) and done % cfg.eval_steps == 0
        if self.evaluation is not None and (at_eval_step or done == self.total_steps):
            self._evaluate_and_log(done, run.result, run.log)
        stopping = faults.any_process(acc, stop.received is not None) and done < self.total_steps
        if stopping or (cfg.save_steps and done % cfg.save_steps == 0 and done < self.total_steps):
            extra = {"window": run.window.state_dict(), "bad_steps": run.bad.state_dict()}
            run.bad.last_checkpoint = self._save_checkpoint(done, run.optimizer, run.scheduler, extra)
        run.bar.update(1)
        for callback in self.callbacks:
            callback(done, run.result.history[-1] if run.result.history else {})
        if stopping:
            raise faults.TrainingInterrupted.after(stop.received, done, self.total_steps,
                                                   run.bad.last_checkpoint)

    def _log_row(self, run: _Run, step: int, grad_norm: float) -> None:
        """The window's averages as a row of the history and ``metrics.jsonl``; diagnosed; on the bar."""
        row = run.window.row(step, lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                             bad_steps=run.bad.total)
        row.update(self.objective.derived_metrics(row))
        run.result.history.append(row)
        run.log.write(row)
        self._diagnose(row, run.result, run.log)
        run.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in row})

    def _resume(self, checkpoint: Path, optimizer, scheduler) -> dict[str, Any]:
        """Weights, optimizer, schedule, RNG and the step source's state from ``checkpoint``: a sharded
        one (written by an FSDP run) into this run's placement, whatever its number of processes."""
        if (checkpoint / SHARDED_DIR).is_dir():
            load_sharded(checkpoint, self.objective.module, optimizer)
            optimizer = None  # restored with the shards
        elif self.sharding.name == "fsdp":
            raise ValueError(f"{checkpoint} was written by a run that did not shard (DDP or one process); "
                             "resume it that way, or train into a new output_dir")
        else:
            self.objective.load(checkpoint)
        state = load_training_state(checkpoint, optimizer, scheduler)
        if (checkpoint / "steps_state.pt").exists():
            self.steps.load_state_dict(torch.load(checkpoint / "steps_state.pt", weights_only=True))
        return state

    def _evaluate_and_log(self, step: int, result: TrainResult, log: MetricsLog) -> None:
        row = {"step": step, **self.evaluate()}
        row.update(self.objective.derived_metrics(row))
        result.eval_history.append(row)
        log.write(row)
        self._diagnose(row, result, log)

    def _diagnose(self, row: dict[str, float], result: TrainResult, log: MetricsLog) -> None:
        """Known failure patterns (:mod:`preftune.engine.diagnostics`): once each, logged and recorded."""
        for diagnosis in self.diagnostics.observe(row):
            logger.warning("warning (%s, step %d): %s", diagnosis.name, diagnosis.step, diagnosis.message)
            log.warn(diagnosis)
            result.warnings.append(diagnosis)

    def _save_model(self, directory: Path, plain: nn.Module | None = None) -> None:
        """The objective's save of ``plain`` (the unwrapped or consolidated module; default: the
        prepared one unwrapped) into ``directory``."""
        prepared = self.objective.module
        self.objective.module = plain if plain is not None else self.accelerator.unwrap_model(prepared)
        try:
            self.objective.save(directory)
        finally:
            self.objective.module = prepared

    def _save_final(self, directory: Path, plain: nn.Module | None, run: _Run) -> None:
        """The model (:meth:`_save_model`) and its card (``README.md``, :mod:`preftune.engine.model_card`)."""
        self._save_model(directory, plain)
        cfg = self.config
        embedded = getattr(cfg, "model", None) in (None, "", "embedded")
        write_model_card(directory, self.card, model=getattr(cfg, "model", None), files=list(cfg.train_files),
                         settings=faults.result_settings(cfg), defaults=self.identity.defaults,
                         history=run.result.history, eval_history=run.result.eval_history,
                         steps=self.total_steps, license_name="mit" if embedded else None)

    def _save_checkpoint(self, step: int, optimizer, scheduler, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (main process; only from finite weights), then prune old ones."""

        shards = self._save_shards(step, optimizer) if self.sharding.name == "fsdp" else None

        def save() -> None:
            save_checkpoint(self.output_dir, step, save_model=None if shards else self._save_model,
                            optimizer=None if shards else optimizer, scheduler=scheduler,
                            extra=self.steps.state_dict(), into=shards,
                            state={"total_steps": self.total_steps, "run": self.identity.to_json(), **state})
            prune_checkpoints(self.output_dir, self.config.save_total_limit)

        name = f"checkpoint-{step}"
        return faults.guarded_write(self.accelerator, self.output_dir, name, step, self.objective.module,
                                    save)

    def _save_shards(self, step: int, optimizer: Any) -> Path:
        """Every process writes its shards of the module and optimizer (torch.distributed.checkpoint) into
        one temporary directory the main process chose; the main process completes it
        (:meth:`_save_checkpoint`)."""
        acc = self.accelerator
        chosen = [str(temporary_dir(self.output_dir / f"checkpoint-{step}")) if acc.is_main_process else None]
        if acc.num_processes > 1:
            torch.distributed.broadcast_object_list(chosen, src=0)
        tmp = Path(chosen[0])
        save_sharded(tmp, self.objective.module, optimizer)
        acc.wait_for_everyone()
        return tmp


def _sum_over_processes(acc: Accelerator, sums: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return sums
    keys = sorted(sums)
    total = acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device), "sum")
    return dict(zip(keys, total.tolist()))


def _accumulate(sums: dict[str, float], out: StepOutput) -> None:
    sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach().float().sum())
    for k, v in out.metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v.float().sum())


