"""Issue 14, the switch from TRL: TRL names, --help, the start-of-run summary, quiet progress."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LOSS_RTOL, base_config
from preftune.engine.config import build_config, load_config
from preftune.engine.keys_help import config_keys
from preftune.engine.progress import LogProgress, progress
from preftune.engine.trl_names import INERT, TRL_CONFIGS, TRL_NAMES, markdown_table
from preftune.methods import CONFIG_CLASSES
from preftune.methods.dpo import DPOConfig, train_dpo

ROOT = Path(__file__).resolve().parents[1]
# settings a TRL name needs beside it to make a valid preftune config
CONTEXT = {"discopop_tau": {"loss": "discopop"}, "loss_weights": {"loss_type": ["sigmoid", "sft"]},
           "desirable_weight": {"loss": "kto"}, "undesirable_weight": {"loss": "kto"},
           **{k: {"lora": True} for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}}


@pytest.mark.parametrize("name", sorted(TRL_NAMES))
def test_every_trl_name_is_accepted_or_explained(name, caplog):
    entry = TRL_NAMES[name]
    values = {"train_file": "d.jsonl", "eval_file": "e.jsonl", **CONTEXT.get(name, {}), name: entry.example}
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    if entry.kind == "none" and name in INERT and INERT[name](entry.example, values):
        with caplog.at_level(logging.INFO, logger="preftune"):  # asks for what preftune does: accepted
            build_config(DPOConfig, values)
        assert f"config: {name}: " in caplog.text and "changes nothing in preftune" in caplog.text
        return
    if entry.kind == "none":
        with pytest.raises(ValueError, match="no preftune equivalent") as err:
            build_config(DPOConfig, values)
        assert entry.note in str(err.value) and name in str(err.value)
        return
    if entry.kind == "same":
        assert name in fields  # the same name, not translated, no notice
    with caplog.at_level(logging.WARNING, logger="preftune"):
        config = build_config(DPOConfig, values, source="run.yaml")
    if entry.kind == "same":
        assert getattr(config, name) == entry.example and "TRL's name" not in caplog.text
        return
    notices = [r.getMessage() for r in caplog.records if f"config: {name} is TRL's name" in r.getMessage()]
    assert len(notices) == 1 and "(run.yaml)" in notices[0]
    if entry.kind == "alias":
        head, _, rest = entry.target.partition(".")
        value = getattr(config, head)
        assert (value[rest] if rest else value) == entry.example


@pytest.mark.parametrize("trl,preftune", [
    ({"beta": 0.2}, {"loss_params": {"beta": 0.2}}),
    ({"label_smoothing": 0.1}, {"loss_params": {"label_smoothing": 0.1}}),
    ({"rpo_alpha": 0.5}, {"loss": {"sigmoid": 1.0, "sft": 0.5}}),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2]}, {"loss": {"sigmoid": 1.0, "sft": 0.2}}),
    ({"loss_type": "ipo"}, {"loss": "ipo"}),
    ({"precompute_ref_log_probs": True}, {"reference": "precomputed"}),
    ({"precompute_ref_log_probs": False, "use_peft": True}, {"reference": "adapter", "lora": True}),
    ({"bf16": True}, {"precision": "bf16"}),
    ({"model_name_or_path": "m"}, {"model": "m"}),
    ({"per_device_train_batch_size": 4, "num_train_epochs": 2}, {"batch_size": 4, "epochs": 2.0}),
    ({"lr_scheduler_type": "constant_with_warmup"}, {"lr_scheduler": "constant"}),
])
def test_trl_settings_equal_their_preftune_translation(trl, preftune):
    assert (build_config(DPOConfig, {"train_file": "d", **trl})
            == build_config(DPOConfig, {"train_file": "d", **preftune}))


@pytest.mark.parametrize(("trl", "accepted"), [
    ({"save_strategy": "steps", "logging_strategy": "steps", "push_to_hub": False, "fp16": False}, True),
    ({"remove_unused_columns": False, "dataloader_num_workers": 4, "do_train": True}, True),
    ({"save_strategy": "epoch"}, False), ({"push_to_hub": True}, False), ({"fp16": True}, False),
    ({"do_eval": True}, False),  # with no evaluation data
    ({"hub_model_id": "me/m", "push_to_hub": True}, False),
])
def test_trl_values_that_ask_for_what_preftune_does_are_accepted_others_refused(trl, accepted):
    values = {"train_file": "d.jsonl", **trl}
    if accepted:
        assert build_config(DPOConfig, values) == build_config(DPOConfig, {"train_file": "d.jsonl"})
    else:
        with pytest.raises(ValueError, match="is a TRL name with no preftune equivalent"):
            build_config(DPOConfig, values)


def test_trl_groups_cover_the_table_and_the_docs_are_in_sync():
    assert {n for names in TRL_CONFIGS.values() for n in names} == set(TRL_NAMES)
    assert "beta" in TRL_CONFIGS["DPOConfig"] and "desirable_weight" in TRL_CONFIGS["KTOConfig"]
    assert (ROOT / "docs" / "trl.md").read_text(encoding="utf-8") == markdown_table()


def test_unknown_keys_say_where_they_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: d.jsonl\nlearning_rat: 1e-5\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown key 'learning_rat'"):
        load_config(DPOConfig, str(path))
    path.write_text("train_file: d.jsonl\n")
    with pytest.raises(ValueError, match=r"^command line: unknown key 'bogus'"):
        load_config(DPOConfig, str(path), ["--bogus", "1"])
    with pytest.raises(ValueError, match=r"^command line: 'fp16' is a TRL name with no preftune equivalent"):
        load_config(DPOConfig, str(path), ["--fp16", "true"])
    assert load_config(DPOConfig, str(path), ["--beta", "0.3"]).loss_params == {"beta": 0.3}


def test_help_lists_every_key_quickly_without_torch():
    code = ("import sys, time, contextlib, io\nt = time.perf_counter()\nfrom preftune.cli import main\n"
            "out = io.StringIO()\nfor cmd in ('dpo', 'sft', 'ppo', 'reward', 'iterate'):\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        main([cmd, '--help'])\n"
            "elapsed = time.perf_counter() - t\n"
            "print(repr((elapsed, 'torch' in sys.modules, 'transformers' in sys.modules, out.getvalue())))")
    elapsed, torch_loaded, hf_loaded, text = eval(subprocess.run(  # noqa: S307 (our own repr)
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert not torch_loaded and not hf_loaded  # what --help costs is what it imports, not a timing
    for command, (module, name) in CONFIG_CLASSES.items():
        cls = getattr(__import__(module, fromlist=[name]), name)
        keys = {k.name: k for k in config_keys((module, name))}
        assert set(keys) == {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert keys[f.name].meaning, f"{command}: {f.name} has no one-line meaning"
            assert eval(keys[f.name].default) == default, f.name  # noqa: S307 (source text of a default)
            assert f"--{f.name} " in text
    assert "loss_params" in text and "auto | model (frozen copy)" in text
    assert "  --dpo.loss_params " in text  # iterate's nested DPO keys


def test_start_of_run_summary_eval_on_start_and_run_name(tmp_path, caplog):
    cfg = base_config(tmp_path, eval_file=str(tmp_path / "train.jsonl"), eval_on_start=True,
                      eval_batch_size=5, run_name="trl-switch", eval_steps=3)
    with caplog.at_level(logging.INFO, logger="preftune"):
        run = train_dpo(cfg)
    lines = [r.getMessage() for r in caplog.records]
    for expected in ("data: 32 training pairs", "data: 32 eval pairs",
                     "reference: auto -> precomputed (log-probs computed once before training, cached): "
                     "6 steps x 8 pairs cover all 32 training pairs",
                     "run: trl-switch", "layout: prefix_shared",
                     "batch: 8 pairs per optimizer step = 8 per micro-batch x 1 accumulated x 1 process",
                     "steps: 6 (1.5 epochs of 32 pairs, 4 steps each)"):
        assert expected in lines, expected
    assert [r["step"] for r in run.train.eval_history] == [0, 3, 6]
    start = run.train.eval_history[0]
    # at step 0 the policy is the reference (maybe scored in other batches): margins of beta 0.1 times four
    # sums of ~50 nats that may each be a few ulps (~1e-5) off, so <~4e-6; a wrong reference makes ~0.1
    assert start["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert start["eval/loss"] == pytest.approx(0.6931, abs=1e-4)  # TRL's figure: log 2 to 4 decimals
    assert json.loads((tmp_path / "out" / "run_identity.json").read_text())["run_name"] == "trl-switch"
    # the eval batch size changes how evaluation is batched, not what it measures
    again = train_dpo({**cfg, "eval_batch_size": 32, "output_dir": str(tmp_path / "again")})
    assert again.train.eval_history[-1]["eval/loss"] == pytest.approx(run.train.eval_history[-1]["eval/loss"],
                                                                      rel=LOSS_RTOL)


def test_progress_is_log_lines_when_not_a_terminal(caplog):
    cfg = build_config(DPOConfig, {"train_file": "d", "logging_steps": 3, "run_name": "r"})
    assert not isinstance(progress(cfg, True, 0, 7, terminal=True), LogProgress)  # a tqdm bar
    bar = progress(cfg, True, 0, 7, terminal=False)
    assert isinstance(bar, LogProgress)
    with caplog.at_level(logging.INFO, logger="preftune"):
        for step in range(7):
            bar.set_postfix({"loss": f"{0.7 - step / 100:.4g}"})
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["r: step 3/7", "r: step 6/7", "r: step 7/7"]
    assert "loss 0.68" in lines[0] and not any("\r" in line for line in lines)
