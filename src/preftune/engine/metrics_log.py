"""Where a run's metrics go: the window of steps since the last logged row (:class:`MetricsWindow`,
averaged into one row) and the files they are written to (:class:`MetricsLog`: ``metrics.jsonl``,
TensorBoard)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.engine.config import TrainConfig


@dataclass
class MetricsWindow:
    """Metric sums of the applied steps since the last logged row; travels in checkpoints, so a
    resumed run logs the same rows as an uninterrupted one."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.tokens += tokens

    def row(self, step: int, **extra: float) -> dict[str, float]:
        """The averages, ``step`` and ``extra``; then start a new window."""
        elapsed = time.perf_counter() - self.started
        row = {k: v / self.steps for k, v in self.sums.items()}
        row.update(step=step, **extra, tokens_per_s=self.tokens / max(elapsed, 1e-9))
        self.sums, self.steps, self.tokens, self.started = {}, 0, 0, time.perf_counter()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "steps": self.steps}


class MetricsLog:
    """``metrics.jsonl`` (appended to on resume, after :func:`faults.apply_start` cut it at the
    checkpoint) and, if asked, TensorBoard (events after the checkpoint purged)."""

    def __init__(self, output_dir: Path, cfg: TrainConfig, main: bool, start: int):
        self.main, self.file, self.tb = main, None, None
        if not main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a" if start > 0 else "w", encoding="utf-8")  # noqa: SIM115
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            purge = start + 1 if start > 0 else None  # events after the checkpoint are logged again
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
