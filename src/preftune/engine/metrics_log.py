"""Where a run's metrics go: the window of steps since the last logged row (:class:`MetricsWindow`,
averaged into one row) and where rows are written (:class:`MetricsLog`: ``metrics.jsonl`` and the
trackers of ``report_to``)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.engine.config import TrainConfig
from preftune.engine.curves import plot_training
from preftune.engine.diagnostics import Diagnosis
from preftune.engine.trackers import TrackedRun, Trackers, tracker_names


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
    checkpoint) and the run's trackers (``report_to``, :mod:`preftune.engine.trackers`); main process
    only, nothing on the others."""

    def __init__(self, output_dir: Path, cfg: TrainConfig, main: bool, start: int):
        self.main, self.file, self.output_dir = main, None, output_dir
        self.trackers = Trackers([], TrackedRun("", None, output_dir), {})
        if not main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        run = TrackedRun(cfg.project or "preftune", cfg.run_name, output_dir, start)
        self.trackers = Trackers(tracker_names(cfg.report_to), run, dataclasses.asdict(cfg))
        self.file = open(output_dir / "metrics.jsonl", "a" if start > 0 else "w", encoding="utf-8")  # noqa: SIM115

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, row: dict[str, Any]) -> None:
        """A metrics row (``step`` and numbers): a line of ``metrics.jsonl``, and to the trackers."""
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.trackers.log(row)

    def warn(self, diagnosis: Diagnosis) -> None:
        """A diagnostics warning: its row in ``metrics.jsonl``, its text to the trackers."""
        if self.file is not None:
            self.file.write(json.dumps(diagnosis.row()) + "\n")
            self.file.flush()
        self.trackers.log_text(f"warnings/{diagnosis.name}", diagnosis.message, diagnosis.step)

    def plots(self, step: int) -> None:
        """With trackers: the run's curves (every row of ``metrics.jsonl``, a resumed run's earlier ones
        too) as ``plots/training.png``, and to the trackers as an image at ``step``."""
        if not self.trackers:
            return
        lines = (self.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [row for row in map(json.loads, lines) if "warning" not in row]
        held = [row for row in rows if any(k.startswith("eval/") for k in row)]
        trained = [row for row in rows if not any(k.startswith("eval/") for k in row)]
        path = plot_training(trained, held, self.output_dir / "plots" / "training.png")
        self.trackers.log_image("plots/training", path, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.trackers.close()
