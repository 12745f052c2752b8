"""What the loop does when something goes wrong: which run an output directory holds, non-finite
steps, and stop signals.

* **Run identity.** Every config field changes the result except :data:`FREE_KEYS` (where and how
  often things are written and shown); the data enter by their fingerprint instead of the file
  name. The identity is stored in ``run_identity.json`` and in every checkpoint; ``resume``
  continues only a run whose identity matches, and otherwise lists each key that differs, old ->
  new. The run's length (:data:`LENGTH_KEYS`) may change on resume, with a warning: the
  learning-rate schedule then follows the new length.
* **Output directory.** A run refuses a directory holding another run's files (``metrics.jsonl``,
  checkpoints, ``final``) unless it resumes that run or ``overwrite: true`` clears them first.
  A resume drops the ``metrics.jsonl`` rows after its checkpoint, so every step is logged once.
* **Non-finite steps.** A step whose loss or gradient norm is not finite is not applied: the
  optimizer does not step (its state and the weights stay as they were) while the scheduler does,
  so step ``s`` always has the data and learning rate of step ``s`` and a resume stays exact.
  Skipped steps are counted (``bad_steps`` in every logged row) and left out of the logged
  averages; ``max_bad_steps`` of them in a row stop the run with a ValueError.
* **Signals.** SIGINT/SIGTERM during :meth:`Trainer.fit` finish the current step, write a
  checkpoint and raise :class:`TrainingInterrupted` (a ``SystemExit`` with status 128 + signal);
  a second signal stops at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.engine.checkpoint import (
    CheckpointWriteError,
    checkpoint_step,
    clean_leftovers,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    remove_dir,
)

logger = logging.getLogger("preftune")

FREE_KEYS = frozenset({
    "output_dir", "resume", "overwrite", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
    "save_final", "progress_bar", "report_to", "reference_cache_dir", "data_cache_dir", "max_bad_steps",
    "eval_on_start", "eval_batch_size", "run_name", "project",  # shown or evaluated, never trained on
    "gradient_checkpointing", "memory_budget_gib",  # memory for time: every mode trains the same weights
    "cpu_allocator",  # where freed memory goes, never a value
})
LENGTH_KEYS = frozenset({"max_steps", "epochs", "num_rollouts"})
#: how the global batch is split over processes and micro-batches: the identity holds their product
SPLIT_KEYS = frozenset({"batch_size", "gradient_accumulation_steps"})
IDENTITY_FILE = "run_identity.json"
METRICS_FILE = "metrics.jsonl"
# a run's files: these, its checkpoints, and the local files of its trackers (engine/trackers.py)
RUN_FILES = (METRICS_FILE, IDENTITY_FILE, "final", "plots",
             "tensorboard", "wandb", "aim", "dvclive", "swanlog")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def result_settings(config: Any) -> dict[str, Any]:
    """The config's values that can change a run's result (not where it writes, logs or caches), as
    JSON values: what a model card lists and its command reproduces."""
    return {k: v for k, v in _json(dataclasses.asdict(config)).items() if k not in FREE_KEYS}


def _show(value: Any) -> str:
    """A value as in the config (JSON); a hash shortened to 12 hex digits."""
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return json.dumps(value, default=str)


@dataclass(frozen=True)
class RunIdentity:
    """The settings that change a run's result (``settings``, hashed) and its length."""

    settings: dict[str, Any]
    length: dict[str, Any]
    defaults: dict[str, Any] = field(compare=False, repr=False)
    name: str | None = field(default=None, compare=False)  # run_name: shown, never part of the identity

    @classmethod
    def of(cls, config: Any, data_fingerprint: str | None = None, num_processes: int = 1) -> RunIdentity:
        """The identity of a run of ``config`` on ``num_processes`` processes: its batch is the global one
        (``batch_size x gradient_accumulation_steps x processes``), so a run resumes on another number of
        processes when the global batch stays (e.g. 2 x 4 pairs -> 1 x 8)."""
        values = _json(dataclasses.asdict(config))
        settings = {"objective": type(config).__name__,
                    **{k: v for k, v in values.items() if k not in FREE_KEYS | LENGTH_KEYS | SPLIT_KEYS}}
        if "batch_size" in values:
            settings["global_batch"] = values["batch_size"] * values.get("gradient_accumulation_steps", 1) * \
                num_processes
        if data_fingerprint is not None:  # the data by content: a moved file is the same run
            del settings["train_file"]
            settings["train_data"] = data_fingerprint
        defaults = {}
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = _json(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = _json(f.default_factory())
        return cls(settings, {k: values[k] for k in sorted(LENGTH_KEYS) if k in values}, defaults,
                   getattr(config, "run_name", None))

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        named = {"run_name": self.name} if self.name else {}
        return {"hash": self.hash, **named, "settings": self.settings, "length": self.length}

    def check(self, stored: dict[str, Any], where: str) -> list[str]:
        """Raise ValueError naming every setting that differs from ``stored`` (a key one side lacks
        counts as its default); return the warnings for a changed length."""
        missing = object()

        def differs(old: dict, new: dict) -> list[str]:
            out = []
            for key in sorted(old.keys() | new.keys()):
                a, b = (side.get(key, self.defaults.get(key, missing)) for side in (old, new))
                if a != b:
                    out.append(f"{key} {'(unset)' if a is missing else _show(a)} -> "
                               f"{'(unset)' if b is missing else _show(b)}")
            return out

        changes = (differs(stored.get("settings", {}), self.settings)
                   if stored.get("hash") != self.hash else [])
        if changes:
            raise ValueError(f"resume: {where} belongs to a different run: {', '.join(changes)}; continue it "
                             "with its settings, or start a new run in another output_dir "
                             "(or with overwrite: true)")
        changes = differs(stored.get("length", {}), self.length)
        return [f"resume: {', '.join(changes)}: the run's length changed; the learning-rate schedule follows "
                "the new length"] if changes else []


# -- the output directory ----------------------------------------------------------------------
@dataclass
class StartPlan:
    """How a run starts in its output directory (decided read-only by every process)."""

    checkpoint: Path | None = None
    remove: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint) if self.checkpoint is not None else 0


def run_files(output_dir: Path) -> list[Path]:
    """A run's own files in ``output_dir`` (other files, e.g. the demo's data, are not a run's)."""
    if not output_dir.is_dir():
        return []
    return [output_dir / n for n in RUN_FILES if (output_dir / n).exists()] + list_checkpoints(output_dir)


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:6]) + (", ..." if len(paths) > 6 else "")


def check_output_dir(config: Any) -> None:
    """Refuse (ValueError) an ``output_dir`` holding a run's files when the config neither resumes
    nor overwrites: the cheap part of :func:`plan_start`, for entry points to call before loading
    anything (the Trainer checks again, with the run's identity)."""
    output_dir = Path(config.output_dir)
    if not config.resume and not config.overwrite and (existing := run_files(output_dir)):
        raise ValueError(f"output_dir {output_dir} already holds a run ({_names(existing)}); set resume: "
                         "true to continue it, overwrite: true to replace it, or choose another output_dir")


def plan_start(output_dir: Path, config: Any, identity: RunIdentity) -> StartPlan:
    """Resume from the newest good checkpoint of the same run, start fresh, or refuse (ValueError)."""
    existing = run_files(output_dir)
    names = _names(existing)
    if not config.resume:
        check_output_dir(config)
        return StartPlan(None, existing,
                         [f"overwrite: removed {names} from {output_dir}"] if existing else [])
    checkpoint, unusable = find_checkpoint(output_dir)
    then = "falling back to an older one" if checkpoint else "skipped"
    notes = [f"resume: {p.name} is unusable ({why}); {then}" for p, why in unusable]
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        notes += identity.check(state.get("run", {}), str(checkpoint))
        notes.append(f"resume: continuing from {checkpoint} (step {checkpoint_step(checkpoint)})")
        return StartPlan(checkpoint, [p for p, _ in unusable], notes)
    record = output_dir / IDENTITY_FILE
    if record.exists():  # the run stopped before its first checkpoint
        notes += identity.check(json.loads(record.read_text()), str(record))
    elif existing:
        raise ValueError(f"resume: output_dir {output_dir} holds files ({names}) but no checkpoint or record "
                         "of the run that wrote them; set overwrite: true to replace them, or choose "
                         "another output_dir")
    if existing:
        notes.append(f"resume: no usable checkpoint in {output_dir}; starting from step 0")
    return StartPlan(None, existing, notes)


def prepare_output_dir(acc: Any, output_dir: Path, config: Any, identity: RunIdentity) -> StartPlan:
    """Clean leftovers (main process), decide on every process alike (ValueError to refuse), then
    prepare the directory (main process): resume the same run, start fresh, or replace a run."""
    if acc.is_main_process:
        for line in clean_leftovers(output_dir):
            logger.info("output_dir: %s", line)
    acc.wait_for_everyone()
    plan = plan_start(output_dir, config, identity)
    acc.wait_for_everyone()
    if acc.is_main_process:
        apply_start(plan, output_dir, identity)
    acc.wait_for_everyone()
    return plan


def apply_start(plan: StartPlan, output_dir: Path, identity: RunIdentity) -> None:
    """Main process: remove what the plan drops, cut ``metrics.jsonl`` at the checkpoint, record
    the identity."""
    for note in plan.notes:
        logger.log(logging.WARNING if "unusable" in note or "length" in note else logging.INFO, note)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in plan.remove:
        if path.is_dir():
            remove_dir(path)
        elif path.exists():
            path.unlink()
    if plan.checkpoint is not None:
        truncate_metrics(output_dir / METRICS_FILE, plan.step)
    write_json_atomically(output_dir / IDENTITY_FILE, identity.to_json())


def write_json_atomically(path: Path, value: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` with ``step <= step`` (a torn last line goes too);
    rewritten atomically. Returns the number of lines dropped."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= step:
            kept.append(line)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


# -- writing checkpoints -----------------------------------------------------------------------
def any_process(acc: Any, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (the processes must agree to stop or fail)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), "sum") > 0)


def last_good(output_dir: Path) -> str:
    last = latest_checkpoint(output_dir)
    if last is None:
        return "no earlier checkpoint exists"
    return f"the last good checkpoint, {last}, is untouched and readable: resume: true continues from it"


def guarded_write(acc: Any, output_dir: Path, name: str, step: int, module: nn.Module,
                  write: Callable[[], Any]) -> Path:
    """``write()`` ``output_dir/name`` on the main process, only from finite weights; if it fails
    (a full disk, ...), every process raises :class:`CheckpointWriteError` naming the last good one."""
    if any_process(acc, bool(bad := nonfinite_tensors(module))):
        raise ValueError(f"not writing {name}: the weights hold non-finite values after step {step} "
                         f"({', '.join(bad[:3]) or 'on another process'}); {last_good(output_dir)}")
    error: Exception | None = None
    if acc.is_main_process:
        try:
            write()
        except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError, RuntimeError, SafetensorError...
            error = e
    if any_process(acc, error is not None):
        what = " ".join(f"{type(error).__name__}: {error}".split()) if error else "on the main process"
        raise CheckpointWriteError(f"could not write {output_dir / name} ({what}); is the disk full? "
                                   f"{last_good(output_dir)}") from error
    acc.wait_for_everyone()
    return output_dir / name


# -- non-finite steps --------------------------------------------------------------------------
class BadSteps:
    """Counts steps with a non-finite loss or gradient norm; ``limit`` of them in a row stop the run."""

    def __init__(self, limit: int, state: dict[str, int] | None = None):
        self.limit = limit
        self.total = (state or {}).get("total", 0)
        self.in_a_row = (state or {}).get("in_a_row", 0)
        self.last_checkpoint: Path | None = None

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def ok(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when step ``step`` (1-based) may update the weights; False to skip it; raises
        ValueError at the ``limit``-th non-finite step in a row."""
        bad = ", ".join(f"{name} {value}" for name, value in (("loss", loss), ("grad_norm", grad_norm))
                        if not math.isfinite(value))
        if not bad:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            last = self.last_checkpoint
            saved = f"the last checkpoint is {last}" if last else "no checkpoint exists"
            raise ValueError(
                f"training stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or "
                f"gradient norm (last: {bad}) and were skipped (max_bad_steps: {self.limit}); lower "
                f"learning_rate or check the data. Nothing was applied or saved from them; {saved}")
        logger.warning("step %d: %s: update skipped (%d in a row; max_bad_steps %d)", step, bad,
                       self.in_a_row, self.limit)
        return False


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` holding a NaN or an infinity."""
    def local(t: torch.Tensor) -> torch.Tensor:  # a sharded parameter: this process's shard
        return t.to_local() if hasattr(t, "to_local") else t

    return [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(local(t)).all())]


# -- stop signals ------------------------------------------------------------------------------
class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped the run after a step and a checkpoint; exit status 128 + signal."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.message, self.signum, self.checkpoint = message, signum, checkpoint

    def __str__(self) -> str:
        return self.message

    @classmethod
    def after(cls, signum: int, step: int, total: int, checkpoint: Path | None) -> TrainingInterrupted:
        message = (f"stopped by {signal.Signals(signum).name} after step {step} of {total}; checkpoint "
                   f"written to {checkpoint}; run again with resume: true to continue")
        logger.warning(message)
        return cls(message, signum, checkpoint)


class StopSignals:
    """``with StopSignals() as stop:`` SIGINT/SIGTERM set ``stop.received`` (the loop ends after the
    current step); a second signal raises KeyboardInterrupt at once. Handlers are installed only
    in the main thread and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("%s: stopping after this step and writing a checkpoint "
                       "(send it again to stop at once)", signal.Signals(signum).name)
