"""One training loop for every objective (DPO and its family, reward models).

The loop knows batches, ``objective.loss(batch) -> StepOutput`` and nothing about any loss.
Gradient accumulation is normalised so that a step equals one big batch: each micro-batch adds
``sum(per_pair_loss) / pairs_in_step`` to the gradient. It runs under ``accelerate``, so
``accelerate launch`` (DDP, FSDP, DeepSpeed) needs no code change.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
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
    """What the loop trains: a module, a per-pair loss, and how to save the result."""

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
    """``Trainer(config, objective, train, collate).fit()``; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        objective: Objective,
        train_data: Sequence[TokenizedPair],
        collate: Callable[[Sequence[TokenizedPair], Sequence[int]], ForwardBatch],
        *,
        eval_data: Sequence[TokenizedPair] = (),
        eval_collate: Callable[[Sequence[TokenizedPair], Sequence[int]], ForwardBatch] | None = None,
        accelerator: Accelerator | None = None,
        callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
    ):
        self.config, self.objective = config, objective
        self.train_data, self.eval_data, self.collate = train_data, eval_data, collate
        self.eval_collate = eval_collate or collate
        self.accelerator = accelerator or make_accelerator(config)
        self.callbacks = callbacks
        self.output_dir = Path(config.output_dir)
        self.global_batch, self.total_steps = step_plan(config, len(train_data), self.accelerator.num_processes)

    # -- one optimizer step -------------------------------------------------------------
    def _micro_batches(self, step: int) -> tuple[list[list[int]], int]:
        """This process's micro-batches of step ``step``, and the number of pairs in the whole step."""
        acc = self.accelerator
        idx = step_indices(len(self.train_data), self.global_batch, self.config.seed, step)
        share = math.ceil(len(idx) / acc.num_processes)
        mine = idx[acc.process_index * share : (acc.process_index + 1) * share]
        b = self.config.batch_size
        return [mine[i : i + b] for i in range(0, len(mine), b)], len(idx)

    def _train_step(self, module: nn.Module, step: int) -> tuple[dict[str, float], int]:
        """Forward/backward over the step's micro-batches. Each adds sum(loss) * world / pairs_in_step,
        so after DDP averages gradients over processes the step's gradient is the mean over all pairs."""
        acc = self.accelerator
        micro, pairs_in_step = self._micro_batches(step)
        sums: dict[str, float] = {}
        tokens = 0
        for i, indices in enumerate(micro):
            batch = self.collate([self.train_data[j] for j in indices], indices).to(acc.device)
            sync = i == len(micro) - 1
            with nullcontext() if sync else acc.no_sync(module), autocast(self.config, acc.device):
                out = self.objective.loss(batch)
                acc.backward(out.loss.sum() * acc.num_processes / pairs_in_step)
            _accumulate(sums, out)
            tokens += batch.num_real_tokens
        sums["_tokens"] = float(tokens)
        sums = _sum_over_processes(acc, sums)
        tokens = int(sums.pop("_tokens"))
        return {k: v / pairs_in_step for k, v in sums.items()}, tokens

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics over ``eval_data`` (in order, no gradient)."""
        self.objective.module.eval()
        sums: dict[str, float] = {}
        b = self.config.batch_size
        for start in range(0, len(self.eval_data), b):
            indices = list(range(start, min(start + b, len(self.eval_data))))
            batch = self.eval_collate([self.eval_data[j] for j in indices], indices).to(self.accelerator.device)
            with autocast(self.config, self.accelerator.device):
                _accumulate(sums, self.objective.loss(batch))
        self.objective.module.train()
        return {f"eval/{k}": v / max(1, len(self.eval_data)) for k, v in sums.items()}

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
                result.history.append(row)
                log.write(row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in row})
                window, window_steps, window_tokens, window_start = {}, 0, 0, time.perf_counter()
            if self.eval_data and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == self.total_steps):
                row = {"step": done, **self.evaluate()}
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

    def _save_model(self, directory: Path) -> None:
        self.objective.module = self.accelerator.unwrap_model(self.objective.module)
        self.objective.save(directory)

    def _save_checkpoint(self, step: int, optimizer, scheduler) -> None:
        if self.accelerator.is_main_process:
            prepared = self.objective.module
            save_checkpoint(self.output_dir, step, save_model=self._save_model, optimizer=optimizer,
                            scheduler=scheduler, state={"global_batch": self.global_batch})
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
