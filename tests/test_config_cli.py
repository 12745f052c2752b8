"""Config validation, overrides and the command line."""

from __future__ import annotations

import pytest

from helpers import base_config
from preftune.cli import main
from preftune.engine.config import parse_overrides
from preftune.methods.dpo import DPOConfig, load_dpo_config


def test_overrides_are_typed_yaml():
    assert parse_overrides(["--beta", "0.2", "--lora", "true", "--loss_params.beta=0.3", "--name", "x"]) == {
        "beta": 0.2, "lora": True, "loss_params": {"beta": 0.3}, "name": "x"}
    with pytest.raises(ValueError, match="--max_steps needs a value"):
        parse_overrides(["--max_steps"])


def test_key_equals_value_keeps_the_values_dashes():
    """``--output-dir=/tmp/my-run``: the key's dashes are underscores, the path stays as written."""
    assert parse_overrides(["--output-dir=/tmp/my-run", "--train-file", "a-b.jsonl"]) == {
        "output_dir": "/tmp/my-run", "train_file": "a-b.jsonl"}


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: data.jsonl\nloss_params: {beta: 0.1}\nmax_steps: 5\n")
    cfg = load_dpo_config(str(path), ["--max_steps", "7", "--loss_params.label_smoothing", "0.1"])
    assert cfg.max_steps == 7 and cfg.loss_params == {"beta": 0.1, "label_smoothing": 0.1}


@pytest.mark.parametrize("yaml_text,message", [
    ("train_file: d.jsonl\nlearning_rat: 1e-5\n",
     "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("train_file: d.jsonl\nbatch_size: many\n", "batch_size must be int"),
    ("train_file: d.jsonl\nlayout: diagonal\n", "layout must be one of"),
    ("train_file: d.jsonl\nloss: sigmod\n", "unknown loss 'sigmod' (did you mean 'sigmoid'?)"),
    ("train_file: d.jsonl\nloss_params: {gamma: 1.0}\n", "loss parameter 'gamma' is not used"),
    ("train_file: d.jsonl\nreference: adapter\n", "reference 'adapter' needs lora: true"),
    ("train_file: d.jsonl\nreference: model\nreference_cache_dir: /tmp/x\n",
     "only used with reference: precomputed"),
    ("train_file: d.jsonl\nlayout: padded\npack_length: 64\n", "pack_length has no effect"),
    ("max_steps: 3\n", "train_file is required"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_is_a_clear_error(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        load_dpo_config(str(path))
    assert message in str(err.value)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_dpo_config(str(path))


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("dpo", "reward", "demo", "convert-llama2c", "bt"):
        assert name in out
    assert main(["dpoo"]) == 2
    assert "did you mean 'dpo'" in capsys.readouterr().err


def test_cli_dpo_run_and_error(tmp_path, capsys):
    import yaml

    cfg = base_config(tmp_path, max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["dpo", "--config", str(path), "--max_steps", "3"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "chosen": " w2"}\n')
    assert main(["dpo", "--config", str(path), "--train_file", str(bad),
                 "--output_dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: row 1: field 'rejected': missing" in err
    assert not (tmp_path / "o2").exists()  # nothing half-written


def test_python_api_accepts_dict_and_dataclass(tmp_path):
    from preftune import train_dpo

    run = train_dpo(DPOConfig(**base_config(tmp_path, max_steps=1)))
    assert run.train.steps == 1


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads 5e-4 as text; preftune reads it as the number meant, in files and flags alike."""
    path = tmp_path / "run.yaml"
    path.write_text("train_file: d.jsonl\nlearning_rate: 5e-4\n")
    assert load_dpo_config(str(path), ["--weight_decay", "1e-2"]).learning_rate == 5e-4
    assert load_dpo_config(str(path), ["--weight_decay", "1e-2"]).weight_decay == 0.01
    with pytest.raises(ValueError, match="learning_rate must be float"):
        load_dpo_config(str(path), ["--learning_rate", "fast"])


def test_nested_overrides_merge_with_the_file(tmp_path):
    from preftune.engine.config import merge_settings

    assert merge_settings({"dpo": {"loss_params": {"beta": 0.1}, "epochs": 2}},
                          parse_overrides(["--dpo.loss_params.beta", "0.3"])) == {
        "dpo": {"loss_params": {"beta": 0.3}, "epochs": 2}}


@pytest.mark.parametrize("argv", [["demo", "--stepz", "3"], ["lab", "frontier", "--bogus"],
                                  ["eval", "--modelz", "x"], ["inspect"], ["bt"], ["convert-llama2c", "a"]])
def test_argument_mistakes_are_one_line(argv, capsys):
    """argparse's own errors (unknown flag, missing argument) are one line too, exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err


def test_a_default_budget_follows_the_max_length_the_user_set(caplog):
    """``--max_length 128`` alone: the default max_prompt_length (512) becomes 64, one log line; only
    two budgets the user set can conflict, and that is one line."""
    import logging

    from preftune.eval.config import EvalConfig

    with caplog.at_level(logging.INFO, logger="preftune"):
        config = load_dpo_config(None, ["--train_file", "x.jsonl", "--max_length", "128"])
    assert (config.max_length, config.max_prompt_length) == (128, 64)
    assert "max_prompt_length 64: half of max_length 128 (the default 512 does not fit in it)" in caplog.text
    with pytest.raises(ValueError, match=r"^config: max_prompt_length 200 must be < max_length 128$"):
        load_dpo_config(None, ["--train_file", "x.jsonl", "--max_length", "128",
                               "--max_prompt_length", "200"])
    assert EvalConfig(models=["embedded"], max_length=100).max_prompt_length == 50
    with pytest.raises(ValueError, match="must be < max_length"):
        EvalConfig(models=["embedded"], max_length=100, max_prompt_length=300)
