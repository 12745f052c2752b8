"""What a run says while it runs: the start-of-run summary and progress (a tqdm bar on a terminal,
one log line every ``logging_steps`` steps otherwise, so a log file gets no carriage-return frames)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from preftune.engine.config import TrainConfig

logger = logging.getLogger("preftune")
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "perplexity", "env/reward")


def start_summary(config: TrainConfig, num_items: int | None, num_processes: int, total_steps: int,
                  noun: str = "pairs") -> list[str]:
    """The lines logged before the first step: run name, layout, effective batch, steps."""
    lines = [f"run: {config.run_name}"] if config.run_name else []
    rows = f" (rows of {config.pack_length} tokens)" if config.pack_length else ""
    lines.append(f"layout: {config.layout}" + rows)
    per_step = config.batch_size * config.gradient_accumulation_steps * num_processes
    lines.append(f"batch: {per_step} {noun} per optimizer step = {config.batch_size} per micro-batch x "
                 f"{config.gradient_accumulation_steps} accumulated x {num_processes} "
                 f"process{'es' if num_processes != 1 else ''}")
    steps = f"steps: {total_steps}"
    if num_items:
        per_epoch = math.ceil(num_items / per_step)
        steps += f" ({total_steps / per_epoch:.3g} epochs of {num_items} {noun}, {per_epoch} steps each)"
    return [*lines, steps]


class LogProgress:
    """tqdm's ``update``/``set_postfix``/``close``, as one log line every ``every`` steps (and the last)."""

    def __init__(self, total: int, initial: int, every: int, name: str | None = None):
        self.total, self.n, self.every, self.name = total, initial, every, name
        self.postfix: dict[str, Any] = {}
        self.started, self.first = time.perf_counter(), initial

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = dict(values)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            elapsed = time.perf_counter() - self.started
            rate = (self.n - self.first) / max(elapsed, 1e-9)
            left = (self.total - self.n) / max(rate, 1e-9)
            shown = "".join(f", {k} {v}" for k, v in self.postfix.items())
            prefix = f"{self.name}: " if self.name else ""
            logger.info("%sstep %d/%d (%d%%)%s, %.1f s elapsed, ~%.0f s left", prefix, self.n, self.total,
                        100 * self.n // max(self.total, 1), shown, elapsed, left)

    def close(self) -> None:
        pass


def progress(config: TrainConfig, main_process: bool, start: int, total: int, *,
             terminal: bool | None = None):
    """A tqdm bar when stderr is a terminal, else :class:`LogProgress`; nothing off the main process
    or with ``progress_bar: false``."""
    from tqdm.auto import tqdm

    enabled = config.progress_bar and main_process
    terminal = sys.stderr.isatty() if terminal is None else terminal
    if enabled and not terminal:
        return LogProgress(total, start, config.logging_steps, config.run_name)
    return tqdm(total=total, initial=start, desc=config.run_name or "train", disable=not enabled,
                dynamic_ncols=True)
