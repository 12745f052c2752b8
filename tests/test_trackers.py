"""report_to through accelerate's trackers, read back from the files each tracker writes (offline):
TensorBoard event files, a wandb offline run, an mlflow file store and trackio's local database hold
the config, every step's metrics, the eval rows, the diagnostics' warning and the run's plot."""

from __future__ import annotations

import pytest

from helpers import base_config, write_pairs
from preftune.engine import trackers
from preftune.engine.config import build_config
from preftune.engine.trackers import TRACKERS, flatten, tracker_names
from preftune.methods.dpo import DPOConfig, train_dpo
from tracker_files import mlflow_run, tensorboard_run, trackio_run, wandb_run

STEPS = 4


def _need(*names: str) -> None:
    missing = [n for n in names if not trackers.installed(n)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e '.[dev]' installs them)")


# -- the run ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One DPO run reporting to the four trackers the dev install has; a learning rate so small that
    the loss stays at log 2, so the ``no_learning`` warning fires at step 3."""
    _need("tensorboard", "wandb", "mlflow", "trackio")
    tmp = tmp_path_factory.mktemp("tracked")
    write_pairs(tmp / "eval.jsonl", n=8, seed=1)
    env = pytest.MonkeyPatch()
    env.setenv("WANDB_MODE", "offline")
    env.setenv("WANDB_SILENT", "true")
    env.setenv("MLFLOW_TRACKING_URI", (tmp / "mlruns").as_uri())
    env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3's file store is "in maintenance", not gone
    env.setenv("TRACKIO_DIR", str(tmp / "trackio"))
    try:
        config = base_config(tmp, max_steps=STEPS, learning_rate=1e-12, eval_file=str(tmp / "eval.jsonl"),
                             eval_steps=2, report_to=["tensorboard", "wandb", "mlflow", "trackio"],
                             run_name="tracked-run", project="preftune-test",
                             loss_params={"beta": 0.25})
        run = train_dpo(config)
    finally:
        env.undo()
    return tmp, run


def _check(scalars: dict[str, dict[int, float]], run) -> None:
    """Every training row's loss at its step, and every eval row's loss at its step, as logged."""
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in run.train.history})
    assert sorted(scalars["loss"]) == list(range(1, STEPS + 1))
    assert scalars["eval/loss"] == pytest.approx({r["step"]: r["eval/loss"] for r in run.train.eval_history})
    assert sorted(scalars["eval/loss"]) == [2, 4]
    assert "rewards/accuracies" in scalars and "lr" in scalars


def test_tensorboard_holds_every_step_the_config_the_warning_and_the_plot(tracked):
    tmp, run = tracked
    assert [w.name for w in run.train.warnings] == ["no_learning"]
    board = tensorboard_run(tmp / "out" / "tensorboard")
    _check(board["scalars"], run)
    assert "loss_params.beta: 0.25" in board["config"] and "run_name: tracked-run" in board["config"]
    assert board["texts"] == {"warnings/no_learning": 3}
    assert board["images"] == ["plots/training"]
    assert (tmp / "out" / "plots" / "training.png").stat().st_size > 1000


def test_wandb_offline_run_holds_every_step_the_config_the_warning_and_the_plot(tracked):
    tmp, run = tracked
    logged = wandb_run(tmp / "out" / "wandb")
    _check(logged["scalars"], run)
    assert logged["config"]["loss_params.beta"] == 0.25 and logged["config"]["project"] == "preftune-test"
    assert "learning rate" in logged["values"]["warnings/no_learning"]
    image = logged["values"]["plots/training"]
    assert image["_type"] == "images/separated" and image["format"] == "png"
    (name,) = image["filenames"]
    assert (next((tmp / "out" / "wandb").glob("offline-run-*")) / "files" / name).stat().st_size > 1000


def test_mlflow_file_store_holds_every_step_the_config_the_warning_and_the_plot(tracked):
    tmp, run = tracked
    logged = mlflow_run((tmp / "mlruns").as_uri())
    _check(logged["scalars"], run)
    assert logged["config"]["loss_params.beta"] == "0.25" and logged["name"] == "tracked-run"
    assert sorted(logged["artifacts"]) == ["plots/training.png", "warnings/no_learning-step3.txt"]


def test_trackio_database_holds_every_step_the_config_the_warning_and_the_plot(tracked):
    tmp, run = tracked
    logged = trackio_run(tmp / "trackio")
    _check(logged["scalars"], run)
    assert logged["names"] == {"tracked-run"} and logged["config"]["loss_params.beta"] == 0.25
    assert "learning rate" in logged["values"]["warnings/no_learning"]
    assert logged["values"]["plots/training"]["_type"] == "trackio.image"


# -- names, packages, failures ---------------------------------------------------------------------
def test_report_to_takes_a_name_a_list_all_or_none(monkeypatch):
    assert tracker_names("none") == [] and tracker_names(None) == []
    assert tracker_names(["tensorboard", "tensorboard"]) == ["tensorboard"]
    monkeypatch.setattr(trackers, "installed", lambda name: name in ("tensorboard", "mlflow"))
    assert tracker_names("all") == ["tensorboard", "mlflow"]


def test_an_unknown_tracker_or_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"report_to 'wandbb' is not a tracker; choose from tensorboard"):
        build_config(DPOConfig, base_config(tmp_path, report_to="wandbb"))
    monkeypatch.setitem(TRACKERS, "aim", "preftune_no_such_module")
    with pytest.raises(ValueError) as error:
        build_config(DPOConfig, base_config(tmp_path, report_to=["tensorboard", "aim"]))
    assert str(error.value) == ("config: report_to 'aim' needs the preftune_no_such_module package: "
                                "pip install 'preftune[aim]'")


def test_a_tracker_that_cannot_start_is_one_line_and_nothing_is_trained(tmp_path, monkeypatch):
    _need("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # mlflow 3 refuses a file store then
    with pytest.raises(ValueError, match=r"^report_to mlflow: could not start the run: .*TRACKING_URI"):
        train_dpo(base_config(tmp_path, report_to="mlflow"))
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert not (tmp_path / "out" / "final").exists()


def test_flatten_gives_every_tracker_plain_values():
    flat = flatten({"loss_params": {"beta": 0.1}, "adam_betas": [0.9, 0.99], "eval_file": None, "lora": False,
                    "dpo": {}})
    assert flat == {"loss_params.beta": 0.1, "adam_betas": "[0.9, 0.99]", "eval_file": "null", "lora": False,
                    "dpo": "{}"}
