"""The README's TRL config (TRL's DPO recipe with ``report_to: wandb`` and ``dataset_name``) runs as
written. Offline, the hub model and dataset are given again on the command line as a tiny model and a
local dataset repository, and W&B runs in offline mode; every logged step is read back from its file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import save_tiny_model
from preftune.engine import trackers
from test_hub_datasets import hub_layout
from tracker_files import wandb_run

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_trl_config() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- trl-config -->\n```yaml\n(.*?)```", text, re.S)
    assert match, "README.md: the TRL config block (after <!-- trl-config -->) is missing"
    return match.group(1)


def test_the_readme_trl_config_is_trl_names_with_wandb_and_a_hub_dataset():
    config = yaml.safe_load(readme_trl_config())
    assert config["report_to"] == "wandb" and config["dataset_name"] == "trl-lib/ultrafeedback_binarized"
    assert {"model_name_or_path", "per_device_train_batch_size", "num_train_epochs", "beta"} <= config.keys()


def test_the_readme_trl_config_runs_as_written(tmp_path, monkeypatch):
    if not trackers.installed("wandb"):
        pytest.skip("needs wandb (pip install -e '.[dev]' installs it)")
    from preftune.cli import main

    (tmp_path / "dpo.yaml").write_text(readme_trl_config())
    save_tiny_model(tmp_path / "model")
    repo = hub_layout(tmp_path)  # data/{train,test}-*.parquet, as the hub dataset is laid out
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "Qwen2-0.5B-DPO"
    code = main(["dpo", "--config", str(tmp_path / "dpo.yaml"), "--model", str(tmp_path / "model"),
                 "--train_file", str(repo), "--max_steps", "3", "--output_dir", str(out)])
    assert code in (0, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r["loss"] for r in rows if "loss" in r}
    held = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    # logging_steps 25: only the last step has a row; evaluation at the end
    assert list(trained) == [3] and list(held) == [3]
    logged = wandb_run(out / "wandb")
    assert logged["scalars"]["loss"] == pytest.approx(trained)
    assert logged["scalars"]["eval/loss"] == pytest.approx(held)
    assert logged["config"]["loss_params.beta"] == 0.1 and logged["config"]["run_name"] == "qwen2-0.5b-dpo"
    assert (out / "final" / "README.md").exists()
