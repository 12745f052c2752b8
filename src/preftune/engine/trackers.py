"""Experiment trackers (``report_to``) through accelerate's tracker classes (``accelerate.tracking``).

``report_to`` names one tracker or a list: :data:`TRACKERS`, ``all`` (every installed one) or ``none``.
Each run of the Trainer is one tracker run, on the main process only:

* start: ``project`` (wandb/trackio/swanlab/comet project, mlflow experiment, clearml project) and
  ``run_name`` name it; the config, flattened (``loss_params.beta``), is its configuration;
* every ``metrics.jsonl`` row (training and ``eval/``) is logged at its optimizer step;
* a diagnostics warning is logged as text ``warnings/<name>`` at the step it fired;
* at the end, the run's plots (``plots/*.png``) are logged as images.

Metrics and configuration go through accelerate's ``GeneralTracker`` API (``start``,
``store_init_configuration``, ``log``, ``finish``) unchanged; only where trackers differ in what they
accept (constructor arguments, images, text) does a table here say how. Files go under ``output_dir``
where the tracker keeps local files (``tensorboard/``, ``wandb/``, ``aim/``, ``dvclive/``); where
mlflow, trackio or comet store is theirs to say (``MLFLOW_TRACKING_URI``, ``TRACKIO_DIR``, ...).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("preftune")

# report_to name -> the module it needs (the pip extra is ``preftune[<name>]``)
TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio", "aim": "aim",
    "comet_ml": "comet_ml", "clearml": "clearml", "swanlab": "swanlab", "dvclive": "dvclive",
}
# what to try when a tracker cannot start its run (the first line of its own error comes first)
_START_HINTS = {
    "wandb": "WANDB_MODE=offline keeps the run on this machine; `wandb login` sends it",
    "mlflow": "MLFLOW_TRACKING_URI names the tracking store",
    "comet_ml": "COMET_API_KEY, or COMET_MODE=offline",
    "clearml": "`clearml-init`, or CLEARML_OFFLINE_MODE=1",
}


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name]) is not None


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """``report_to`` as a list of tracker names: ``all`` is every installed one, ``none`` (or nothing)
    none. Raises ValueError (one line) for an unknown name or one whose package is missing."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [n for n in names if n not in TRACKERS and n not in ("all", "none")]
    if unknown:
        raise ValueError(f"config: report_to {unknown[0]!r} is not a tracker; choose from "
                         f"{', '.join(TRACKERS)}, all or none")
    if "all" in names:
        return [n for n in TRACKERS if installed(n)]
    chosen = list(dict.fromkeys(n for n in names if n != "none"))
    for name in chosen:
        if not installed(name):
            raise ValueError(f"config: report_to {name!r} needs the {TRACKERS[name]} package: "
                             f"pip install 'preftune[{name}]'")
    return chosen


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as one level of keys (``{"loss_params": {"beta": 0.1}}`` -> ``loss_params.beta``),
    values that every tracker stores: numbers, booleans and strings (lists as text, None as ``null``)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


@dataclass(frozen=True)
class TrackedRun:
    """What names a run in its trackers and where local files go."""

    project: str
    name: str | None
    output_dir: Path
    start_step: int = 0  # > 0 when resumed: TensorBoard drops its events after this step


def _construct(name: str, run: TrackedRun) -> Any:
    """accelerate's tracker for ``name`` with the arguments that name ``run`` (not yet started)."""
    from accelerate import tracking

    out = run.output_dir
    # each tracker names project and run differently; this is their only difference at start
    arguments: dict[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]] = {
        "tensorboard": lambda: (("tensorboard", str(out)), {"purge_step": run.start_step + 1 if run.start_step
                                                              else None}),
        "wandb": lambda: ((run.project,), {"name": run.name, "dir": str(out)}),
        "mlflow": lambda: ((), {"experiment_name": run.project, "run_name": run.name}),
        "trackio": lambda: ((run.project,), {"name": run.name}),
        "aim": lambda: ((run.name or run.project, str(out / "aim")), {"experiment": run.project}),
        "comet_ml": lambda: ((run.project,), {}),
        "clearml": lambda: ((run.name or run.project,), {"project_name": run.project}),
        "swanlab": lambda: ((run.project,), {"experiment_name": run.name, "logdir": str(out / "swanlog")}),
        "dvclive": lambda: ((run.name,), {"dir": str(out / "dvclive")}),
    }
    args, kwargs = arguments[name]()
    return tracking.LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)


def _image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _log_image_as_artifact(tracker: Any, key: str, path: Path, step: int) -> None:
    tracker.log_artifact(str(path), "plots")


def _log_image_trackio(tracker: Any, key: str, path: Path, step: int) -> None:
    import trackio

    tracker.log({key: trackio.Image(str(path))}, step=step)


def _log_image_tensorboard(tracker: Any, key: str, path: Path, step: int) -> None:
    import numpy as np

    tracker.log_images({key: np.asarray(_image(path))[None]}, step=step, dataformats="NHWC")


# how each tracker takes a PNG (accelerate's log_images input differs per tracker)
_IMAGE_LOGGERS: dict[str, Callable[[Any, str, Path, int], None]] = {
    "tensorboard": _log_image_tensorboard,
    "wandb": lambda t, key, path, step: t.log_images({key: [_image(path)]}, step=step),
    "swanlab": lambda t, key, path, step: t.log_images({key: [_image(path)]}, step=step),
    "aim": lambda t, key, path, step: t.log_images({key: _image(path)}, step=step),
    "clearml": lambda t, key, path, step: t.log_images({key: _image(path)}, step=step),
    "mlflow": _log_image_as_artifact,
    "trackio": _log_image_trackio,
    "comet_ml": lambda t, key, path, step: t.tracker.log_image(str(path), name=key, step=step),
    "dvclive": lambda t, key, path, step: t.live.log_image(f"{key.replace('/', '_')}.png", str(path)),
}


def _log_text_mlflow(tracker: Any, key: str, text: str, step: int) -> None:
    import mlflow

    mlflow.log_text(text, f"{key}-step{step}.txt")


# trackers whose ``log`` drops text; the others take ``{key: text}``
_TEXT_LOGGERS: dict[str, Callable[[Any, str, str, int], None]] = {
    "mlflow": _log_text_mlflow,
    "clearml": lambda t, key, text, step: t.task.get_logger().report_text(f"step {step}, {key}: {text}"),
    "dvclive": lambda t, key, text, step: t.live.log_param(f"{key}@{step}", text),
}


class Trackers:
    """The started trackers of one run (none on other processes, or with ``report_to: none``)."""

    def __init__(self, names: list[str], run: TrackedRun, config: Mapping[str, Any]):
        self.trackers: list[tuple[str, Any]] = []
        if names:
            run.output_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            tracker = _construct(name, run)
            try:
                tracker.start()
                tracker.store_init_configuration(flatten(config))
            except Exception as error:  # the tracker's own failure, as one line
                self.close()
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                hint = f" ({_START_HINTS[name]})" if name in _START_HINTS else ""
                raise ValueError(f"report_to {name}: could not start the run: {first}{hint}") from error
            self.trackers.append((name, tracker))
        if self.trackers:
            logger.info("reporting to %s", ", ".join(name for name, _ in self.trackers))

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, row: Mapping[str, Any]) -> None:
        """A metrics row (``step`` and numbers) at its step."""
        values = {k: v for k, v in row.items() if k != "step"}
        for _, tracker in self.trackers:
            tracker.log(values, step=int(row["step"]))

    def log_text(self, key: str, text: str, step: int) -> None:
        for name, tracker in self.trackers:
            if name in _TEXT_LOGGERS:
                _TEXT_LOGGERS[name](tracker, key, text, step)
            else:
                tracker.log({key: text}, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        for name, tracker in self.trackers:
            _IMAGE_LOGGERS[name](tracker, key, path, step)

    def close(self) -> None:
        for _, tracker in self.trackers:
            tracker.finish()
        self.trackers = []
