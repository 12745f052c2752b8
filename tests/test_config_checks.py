"""Config checks before anything loads (issue 13, part 2): hyperparameter ranges, options without
effect, paths, chat_template, max_length against the model's positions, and one-line CLI errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import CHAT_TEMPLATE, base_config, save_tiny_model, write_pairs
from preftune.cli import main
from preftune.engine.setup import load_run_tokenizer
from preftune.losses import LOSSES
from preftune.methods.dpo import DPOConfig, train_dpo
from preftune.methods.reward import RewardConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("loss,params,message", [
    ("sigmoid", {"beta": 0}, "config: loss_params.beta must be > 0, got 0"),
    ("ipo", {"beta": -1.0}, "config: loss_params.beta must be > 0, got -1.0"),
    ("sigmoid", {"label_smoothing": 0.5}, "config: loss_params.label_smoothing must be in [0, 0.5), got 0.5"),
    ("exo_pair", {"label_smoothing": 0.0}, "config: loss_params.label_smoothing must be in (0, 1), got 0.0"),
    ("discopop", {"discopop_tau": 0.0}, "config: loss_params.discopop_tau must be > 0, got 0.0"),
    ("simpo", {"gamma": -0.5}, "config: loss_params.gamma must be >= 0, got -0.5"),
    ("kto", {"desirable_weight": 0.0}, "config: loss_params.desirable_weight must be > 0, got 0.0"),
    ("chosen_logratio_l2", {"l2_tolerance": -1.0}, "config: loss_params.l2_tolerance must be >= 0, got -1.0"),
    ("sigmoid", {"beta": float("nan")}, "config: loss_params.beta must be > 0, got nan"),
    ("sigmoid", {"beta": "high"}, "config: loss_params.beta must be > 0, got 'high'"),
    ({"sigmoid": 1.0, "exo_pair": 1.0}, {"label_smoothing": 0.7},
     "config: loss_params.label_smoothing must be in [0, 0.5) for loss 'sigmoid', got 0.7"),
])
def test_hyperparameter_out_of_range_names_the_key(loss, params, message):
    with pytest.raises(ValueError) as err:
        DPOConfig(train_file="d.jsonl", loss=loss, loss_params=params)
    assert str(err.value) == message


def test_in_range_values_pass():
    DPOConfig(train_file="d.jsonl", loss="exo_pair", loss_params={"beta": 0.5, "label_smoothing": 1e-3})
    DPOConfig(train_file="d.jsonl", loss="simpo", loss_params={"gamma": 0.0, "label_smoothing": 0.0})


def test_every_builtin_hyperparameter_declares_a_range():
    missing = {name: [p for p in spec.params if spec.range_of(p) is None] for name, spec in LOSSES.items()
               if not name.startswith("test_")}
    assert {k: v for k, v in missing.items() if v} == {}


@pytest.mark.parametrize("settings,message", [
    ({"lora_r": 16}, "config: lora_r has no effect without lora: true; remove it"),
    ({"lora_target_modules": ["q_proj"]}, "config: lora_target_modules has no effect without lora: true"),
    ({"eval_steps": 5}, "config: eval_steps has no effect without eval_file; remove it"),
    ({"warmup_steps": 3, "warmup_ratio": 0.1}, "config: warmup_ratio has no effect beside warmup_steps"),
    ({"optimizer": "rmsprop", "adam_betas": [0.8, 0.99]},
     "config: adam_betas has no effect with optimizer: rmsprop"),
])
def test_option_without_effect_is_an_error(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DPOConfig(train_file="d.jsonl", **settings)


def test_options_with_effect_pass():
    DPOConfig(train_file="d.jsonl", lora=True, lora_r=16)
    DPOConfig(train_file="d.jsonl", eval_file="e.jsonl", eval_steps=5)
    DPOConfig(train_file="d.jsonl", warmup_steps=3)
    DPOConfig(train_file="d.jsonl", optimizer="rmsprop")


@pytest.mark.parametrize("key,value", [("gradient_checkpointing", True), ("logit_chunk_size", 64)])
def test_reward_model_refuses_what_it_never_applies(key, value):
    with pytest.raises(ValueError, match=f"config: {key} has no effect for reward models"):
        RewardConfig(train_file="d.jsonl", **{key: value})
    RewardConfig(train_file="d.jsonl", gradient_checkpointing=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "train.jsonl")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("key,value,message", [
    ("model", "/no/such/dir", "config: model: no such model directory: /no/such/dir"),
    ("model", "{tmp}/empty", "config: model: {tmp}/empty is a directory without config.json"),
    ("model", "{tmp}/train.jsonl", "config: model: {tmp}/train.jsonl is a file, not a model directory"),
    ("tokenizer", "{tmp}/weights_only",
     "config: tokenizer: {tmp}/weights_only is a directory without tokenizer files"),
    ("reference_model", "./missing-ref", "config: reference_model: no such model directory: ./missing-ref"),
    ("train_file", "{tmp}/nope.jsonl", "config: train_file: no such file or directory: {tmp}/nope.jsonl"),
    ("eval_file", "{tmp}/nope.jsonl", "config: eval_file: no such file or directory: {tmp}/nope.jsonl"),
    ("chat_template", "{tmp}/template.jinja", "config: chat_template: no such file: {tmp}/template.jinja"),
])
def test_bad_path_is_one_line_naming_the_key(run_dir, key, value, message):
    config = DPOConfig(**base_config(run_dir, **{key: value.format(tmp=run_dir)}))
    with pytest.raises(FileNotFoundError) as err:
        load_run_tokenizer(config)
    assert str(err.value).startswith(message.format(tmp=run_dir)) and "\n" not in str(err.value)


def test_hub_id_that_cannot_be_fetched_is_one_line(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = DPOConfig(**base_config(run_dir, model="no-such-org/no-such-model"))
    with pytest.raises(FileNotFoundError) as err:
        load_run_tokenizer(config)
    message = str(err.value)
    assert message.startswith("config: model: no-such-org/no-such-model is not a local directory and "
                              "could not be loaded from the Hugging Face hub (") and "\n" not in message


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_is_applied_and_saved(run_dir, as_file):
    from transformers import AutoTokenizer

    template = CHAT_TEMPLATE.replace("<assistant> ", "<assistant> w0 ")  # differs from the tokenizer's own
    value = template
    if as_file:
        (run_dir / "t.jinja").write_text(template)
        value = str(run_dir / "t.jinja")
    run = train_dpo(base_config(run_dir, max_steps=1, chat_template=value))
    assert run.data.train.pairs
    saved = AutoTokenizer.from_pretrained(run.train.final_dir)
    assert saved.chat_template == template


def test_default_max_length_is_capped_to_the_model_with_one_notice(run_dir, caplog):
    config = DPOConfig(**base_config(run_dir))  # the tiny model has 256 positions; the default is 1024
    with caplog.at_level(logging.INFO, logger="preftune"):
        load_run_tokenizer(config)
    assert (config.max_length, config.max_prompt_length) == (256, 128)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("max_length")]
    assert notes == [f"max_length: 256, not the default 1024: model {run_dir}/model has 256 positions "
                     "(max_position_embeddings), max_prompt_length 128"]


def test_max_length_set_above_the_model_is_an_error(run_dir):
    config = DPOConfig(**base_config(run_dir, max_length=2048))
    with pytest.raises(ValueError, match=r"config: max_length 2048 exceeds the 256 positions of model .* "
                                         r"set max_length <= 256"):
        load_run_tokenizer(config)
    config = DPOConfig(**base_config(run_dir, max_length=200, max_prompt_length=100))
    load_run_tokenizer(config)
    assert (config.max_length, config.max_prompt_length) == (200, 100)


def test_embedded_model_default_is_capped_to_512():
    config = DPOConfig(train_file=__file__)
    load_run_tokenizer(config)
    assert (config.max_length, config.max_prompt_length) == (512, 256)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = CONFIGS / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes == 2 and config.mixed_precision == "no"
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"]
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


# -- the command line: every user mistake is one line and exit status 2 ----------------------------
def cli_cases(tmp: Path) -> list[tuple[list[str], str]]:
    pairs = str(tmp / "train.jsonl")
    (tmp / "bad.yaml").write_text("train_file: [a\n")
    (tmp / "run.yaml").write_text(yaml.safe_dump({"train_file": pairs, "lora_r": 4}))
    (tmp / "wins.csv").write_text("winner,loser\na\n")
    return [
        (["dpo", "--train_file", pairs, "--model", "/no/such/dir"], "config: model: no such model directory"),
        (["dpo", "--config", str(tmp / "none.yaml")], f"--config {tmp}/none.yaml: No such file or directory"),
        (["dpo", "--config", str(tmp)], f"--config {tmp}: Is a directory"),
        (["dpo", "--config", str(tmp / "bad.yaml")], "not valid YAML: expected ',' or ']'"),
        (["dpo", "--config", str(tmp / "run.yaml")], "lora_r has no effect without lora: true"),
        (["dpo", "--train_file", pairs, "--loss_params.beta", "0"],
         "config: loss_params.beta must be > 0, got 0"),
        (["dpo", "--train_file", pairs, "--max_steps", "[1"], "is not a valid YAML value"),
        (["sft", "--train_file", str(tmp / "none.jsonl")], "config: train_file: no such file or directory"),
        (["reward", "--train_file", pairs, "--gradient_checkpointing", "true"],
         "has no effect for reward models"),
        (["ppo", "--train_file", pairs, "--reward_model", "/no/rm"],
         "config: reward_model: no such model directory"),
        (["bt", str(tmp / "wins.csv")], "wins.csv"),
        (["convert-llama2c", str(tmp / "a.bin"), str(tmp / "b.bin"), str(tmp / "out")],
         "no such file or directory"),
        (["demo", "--beta", "0"], "beta"),
        (["iterate", "--train_file", str(tmp / "none.jsonl"), "--judge", "sentiment"], "train_file"),
        (["eval", "--models", "/no/such", "--baseline", "/no/b", "--pairs", pairs], "/no/such"),
        (["inspect", str(tmp / "none.jsonl")], "no such file or directory"),
        (["aggregate", str(tmp / "none.jsonl"), "--out", str(tmp / "o.jsonl")], "no such file or directory"),
    ]


def test_every_command_reports_a_user_mistake_in_one_line(run_dir, capsys):
    for argv, expected in cli_cases(run_dir):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert (len(err) == 1 and err[0].startswith(f"preftune {argv[0]}: error: ")
                and expected in err[0]), (argv, err)
        assert "Traceback" not in err[0]


def test_missing_model_dir_in_a_real_process(run_dir):
    """The issue's case end to end: no traceback, no OSError about repo ids, one line, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "preftune", "dpo",
                           "--train_file", str(run_dir / "train.jsonl"),
                           "--model", "/no/such/dir", "--output_dir", str(run_dir / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "preftune dpo: error: config: model: no such model directory: /no/such/dir"
    assert not (run_dir / "out").exists()


def test_internal_error_keeps_its_traceback(monkeypatch):
    import preftune.methods.dpo as dpo

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(dpo, "train_dpo", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["dpo", "--train_file", __file__])


def test_run_yaml_with_every_check_passes(run_dir):
    path = run_dir / "ok.yaml"
    path.write_text(json.dumps(base_config(run_dir, max_steps=1, output_dir=str(run_dir / "ok"))))
    assert main(["dpo", "--config", str(path)]) == 0
