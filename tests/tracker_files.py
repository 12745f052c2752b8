"""Readers of the files each experiment tracker writes, for the tests: what a run logged, read back."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path


def tensorboard_run(directory: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: {e.step: e.value for e in events.Scalars(t)} for t in tags["scalars"]}
    texts = {t.removesuffix("/text_summary"): e.step for t in tags["tensors"] for e in events.Tensors(t)}
    hparams = next(directory.glob("*/hparams.yml")).read_text()
    return {"scalars": scalars, "images": tags["images"], "texts": texts, "config": hparams}


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records (4-byte crc, 2-byte length, 1-byte type: full 1, first 2, middle 3, last 4) hold protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def wandb_run(directory: Path) -> dict:
    (path,) = directory.glob("offline-run-*/run-*.wandb")
    scalars: dict[str, dict[int, float]] = {}
    config: dict[str, object] = {}
    values: dict[str, object] = {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, object] = {}
            for item in record.history.item:  # a nested key is a path: ("plots/training", "format")
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = json.loads(item.value_json)
            for key, value in row.items():
                values[key] = value
                if isinstance(value, (int, float)) and not key.startswith("_"):
                    scalars.setdefault(key, {})[row["_step"]] = value
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return {"scalars": scalars, "config": config, "values": values}


def mlflow_run(uri: str, experiment_name: str = "preftune-test") -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == experiment_name]
    (run,) = client.search_runs([experiment.experiment_id])
    scalars = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    artifacts = [a.path for folder in ("plots", "warnings")
                 for a in client.list_artifacts(run.info.run_id, folder)]
    return {"scalars": scalars, "config": run.data.params, "artifacts": artifacts,
            "name": run.data.tags.get("mlflow.runName")}


def trackio_run(directory: Path, project: str = "preftune-test") -> dict:
    with sqlite3.connect(directory / f"{project}.db") as db:
        rows = db.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
        (config,) = [json.loads(c) for (c,) in db.execute("SELECT config FROM configs").fetchall()]
    scalars: dict[str, dict[int, float]] = {}
    values: dict[str, object] = {}
    for _name, step, metrics in rows:
        for key, value in json.loads(metrics).items():
            values[key] = value
            if isinstance(value, (int, float)):
                scalars.setdefault(key, {})[step] = value
    return {"scalars": scalars, "config": config, "values": values, "names": {r[0] for r in rows}}
