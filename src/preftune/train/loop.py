"""One training loop for every objective (DPO and its family, reward models, SFT, PPO).

The loop knows a step source (which micro-batches make optimizer step ``s``), the objective's
``loss(batch) -> StepOutput`` and nothing about any loss. Each item of a batch weighs ``units``
(1 per pair for preference losses, its scored tokens for SFT and PPO), and a step's gradient is
the mean over the step's units: each micro-batch adds ``sum(per_item_loss) / units_in_step``, so
gradient accumulation equals one big batch. It runs under ``accelerate``, so ``accelerate
launch`` (DDP, FSDP, DeepSpeed) needs no code change.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from preftune.data.batching import ForwardBatch
from preftune.data.tokenize import TokenizedPair
from preftune.train.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from preftune.train.config import TrainConfig
from preftune.train.setup import autocast, make_accelerator


@dataclass(frozen=True)
class StepOutput:
    """``loss``: ``[B]`` per-pair losses (differentiable); ``metrics``: name -> ``[B]`` detached values."""

    loss: Tensor
    metrics: dict[str, Tensor]


class Objective(Protocol):
    """What the loop trains: a module, a per-item loss, and how to save the result."""

    module: nn.Module

    def loss(self, batch: ForwardBatch) -> StepOutput: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None


def step_indices(num_items: int, global_batch: int, seed: int, step: int) -> list[int]:
    """Dataset positions of optimizer step ``step``: epoch-wise seeded permutations, in order."""
    per_epoch = math.ceil(num_items / global_batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * global_batch : (k + 1) * global_batch].tolist()


def step_plan(config: TrainConfig, num_items: int, num_processes: int) -> tuple[int, int]:
    """(pairs per optimizer step over all processes, optimizer steps in the run)."""
    global_batch = config.batch_size * config.gradient_accumulation_steps * num_processes
    per_epoch = math.ceil(num_items / global_batch)
    return global_batch, config.max_steps or max(1, math.ceil(config.epochs * per_epoch))


@dataclass
class StepBatches:
    """This process's micro-batches of one optimizer step, the units of the whole step (over all
    processes) and step-level metrics (e.g. PPO's rollout statistics), averaged like the others."""

    batches: list[Any]
    units: float
    metrics: dict[str, float] = field(default_factory=dict)


class StepSource(Protocol):
    """Which micro-batches make optimizer step ``step``. A batch has ``.to(device)`` and
    ``.num_real_tokens``; ``state_dict``/``load_state_dict`` (optional) travel in checkpoints."""

    def total_steps(self, num_processes: int) -> int: ...

    def step(self, step: int, process_index: int, num_processes: int) -> StepBatches: ...


def one_per_pair(pair: TokenizedPair) -> float:
    return 1.0


class DatasetSteps:
    """Optimizer step ``s`` of a fixed dataset: the ``s``-th slice of epoch-wise seeded
    permutations (:func:`step_indices`), split over processes, then into micro-batches."""

    def __init__(self, config: TrainConfig, pairs: Sequence[TokenizedPair],
                 collate: Callable[[Sequence[TokenizedPair], Sequence[int]], Any],
                 units: Callable[[TokenizedPair], float] = one_per_pair, index_offset: int = 0):
        self.config, self.pairs, self.collate, self.units = config, pairs, collate, units
        self.index_offset = index_offset  # added to dataset positions (e.g. eval rows of a reference cache)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: Sequence[int]) -> Any:
        return self.collate([self.pairs[j] for j in indices], [self.index_offset + j for j in indices])

    def total_steps(self, num_processes: int) -> int:
        return step_plan(self.config, len(self.pairs), num_processes)[1]

    def step(self, step: int, process_index: int, num_processes: int) -> StepBatches:
        global_batch = step_plan(self.config, len(self.pairs), num_processes)[0]
        idx = step_indices(len(self.pairs), global_batch, self.config.seed, step)
        share = math.ceil(len(idx) / num_processes)
        mine = idx[process_index * share : (process_index + 1) * share]
        b = self.config.batch_size
        return StepBatches([self.batch(mine[i : i + b]) for i in range(0, len(mine), b)],
                           sum(self.units(self.pairs[j]) for j in idx))

    def in_order(self) -> Iterator[tuple[Any, float]]:
        """(batch, units) over the whole dataset in order, ``batch_size`` items each (evaluation)."""
        b = self.config.batch_size
        for start in range(0, len(self.pairs), b):
            indices = range(start, min(start + b, len(self.pairs)))
            yield self.batch(indices), sum(self.units(self.pairs[j]) for j in indices)


def make_optimizer(config: TrainConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # the fused kernel: one pass over each tensor, no temporaries (about 9x faster on CPU than foreach)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        params, lr=config.learning_rate, betas=tuple(config.adam_betas), weight_decay=config.weight_decay,
        fused=fused or None,
    )


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total: int):
    """Linear warmup, then linear decay to 0, cosine decay to 0, or constant."""
    warmup = config.warmup_steps or int(config.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    ):
        self.config, self.objective, self.steps, self.evaluation = config, objective, steps, evaluation
        self.accelerator = accelerator or make_accelerator(config)
        self.callbacks = callbacks
        self.output_dir = Path(config.output_dir)
        self.total_steps = steps.total_steps(self.accelerator.num_processes)

    # -- one optimizer step -------------------------------------------------------------
    def _train_step(self, module: nn.Module, step: int) -> tuple[dict[str, float], int]:
        """Forward/backward over the step's micro-batches. Each adds sum(loss) * world / units_in_step,
        so after DDP averages gradients over processes the step's gradient is the mean over all units."""
        acc = self.accelerator
        plan = self.steps.step(step, acc.process_index, acc.num_processes)
        sums: dict[str, float] = {}
        tokens = 0
        for i, batch in enumerate(plan.batches):
            batch = batch.to(acc.device)
            sync = i == len(plan.batches) - 1
            with nullcontext() if sync else acc.no_sync(module), autocast(self.config, acc.device):
                out = self.objective.loss(batch)
                acc.backward(out.loss.sum() * acc.num_processes / plan.units)
            _accumulate(sums, out)
            tokens += batch.num_real_tokens
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
        for batch, batch_units in self.evaluation.in_order():
            with autocast(self.config, self.accelerator.device):
                _accumulate(sums, self.objective.loss(batch.to(self.accelerator.device)))
            units += batch_units
        self.objective.module.train()
        return {f"eval/{k}": v / max(units, 1e-12) for k, v in sums.items()}

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        torch.manual_seed(cfg.seed)
        module = self.objective.module
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        scheduler = make_scheduler(cfg, optimizer, self.total_steps)
        start = 0
        resume_from = latest_checkpoint(self.output_dir) if cfg.resume else None
        if resume_from is not None:
            self.objective.load(resume_from)
            start = load_training_state(resume_from, optimizer, scheduler)["step"]
            if hasattr(self.steps, "load_state_dict") and (resume_from / "steps_state.pt").exists():
                self.steps.load_state_dict(torch.load(resume_from / "steps_state.pt", weights_only=True))
        prepared, optimizer = acc.prepare(module, optimizer)
        self.objective.module = prepared
        prepared.train()
        result = TrainResult(self.output_dir, self.total_steps)
        log = _MetricsLog(self.output_dir, cfg, acc.is_main_process, resume=start > 0)
        bar = _progress(cfg, acc, start, self.total_steps)
        window: dict[str, float] = {}
        window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        for step in range(start, self.total_steps):
            metrics, tokens = self._train_step(prepared, step)
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            window_tokens += tokens
            done = step + 1
            if done % cfg.logging_steps == 0 or done == self.total_steps:
                elapsed = time.perf_counter() - window_start
                row = {k: v / window_steps for k, v in window.items()}
                row.update(step=done, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                           tokens_per_s=window_tokens / max(elapsed, 1e-9))
                row.update(self._derived(row))
                result.history.append(row)
                log.write(row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in row})
                window, window_steps, window_tokens, window_start = {}, 0, 0, time.perf_counter()
            if self.evaluation is not None and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == self.total_steps):
                row = {"step": done, **self.evaluate()}
                row.update(self._derived(row))
                result.eval_history.append(row)
                log.write(row)
            if cfg.save_steps and done % cfg.save_steps == 0 and done < self.total_steps:
                self._save_checkpoint(done, optimizer, scheduler)
            bar.update(1)
            for callback in self.callbacks:
                callback(done, result.history[-1] if result.history else {})
        bar.close()
        log.close()
        if cfg.save_final and acc.is_main_process:
            from preftune.train.checkpoint import write_atomically

            result.final_dir = write_atomically(self.output_dir / "final", self._save_model)
        acc.wait_for_everyone()
        return result

    def _derived(self, row: dict[str, float]) -> dict[str, float]:
        """Metrics the objective derives from a logged row (e.g. SFT's perplexity = exp(loss))."""
        derive = getattr(self.objective, "derived_metrics", None)
        return derive(row) if derive is not None else {}

    def _save_model(self, directory: Path) -> None:
        self.objective.module = self.accelerator.unwrap_model(self.objective.module)
        self.objective.save(directory)

    def _save_checkpoint(self, step: int, optimizer, scheduler) -> None:
        if self.accelerator.is_main_process:
            prepared = self.objective.module
            steps_state = self.steps.state_dict() if hasattr(self.steps, "state_dict") else None
            save_checkpoint(self.output_dir, step, save_model=self._save_model, optimizer=optimizer,
                            scheduler=scheduler, state={"total_steps": self.total_steps}, extra=steps_state)
            self.objective.module = prepared
        self.accelerator.wait_for_everyone()


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


class _MetricsLog:
    """``metrics.jsonl`` (appended on resume) and, if asked, TensorBoard."""

    def __init__(self, output_dir: Path, cfg: TrainConfig, main: bool, resume: bool):
        self.main, self.file, self.tb = main, None, None
        if not main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a" if resume else "w", encoding="utf-8")  # noqa: SIM115
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _progress(cfg: TrainConfig, acc: Accelerator, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", disable=not (cfg.progress_bar and acc.is_main_process),
                dynamic_ncols=True)
