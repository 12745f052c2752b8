"""Broken model directories (issue 24, part 5): missing or truncated weights, a corrupt safetensors
header, a sharded checkpoint missing a shard, an unreadable config.json or tokenizer are one line naming
the key and the path, found before anything loads or is written, for every key and command that
names a model directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import base_config, save_tiny_model
from preftune.cli import main
from preftune.model.hub import check_model_path
from preftune.model.load import load_model, load_tokenizer

WEIGHTS = "model.safetensors"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("pristine") / "model")


def shard(d: Path) -> None:
    """model.safetensors -> two shards and model.safetensors.index.json, as save_pretrained writes them."""
    state = load_file(str(d / WEIGHTS))
    (d / WEIGHTS).unlink()
    names = sorted(state)
    parts = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2 :]}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(d / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def corrupt_header(d: Path) -> None:
    data = bytearray((d / WEIGHTS).read_bytes())
    data[8:18] = b"#corrupt#!"  # the JSON header's first bytes
    (d / WEIGHTS).write_bytes(bytes(data))


def missing_shard(d: Path) -> None:
    shard(d)
    (d / SHARDS[1]).unlink()


def half_size(d: Path) -> tuple[int, int]:
    """(bytes of tensors the header lists, bytes the truncated file holds after its header)."""
    size = (d / WEIGHTS).stat().st_size
    header = int.from_bytes((d / WEIGHTS).read_bytes()[:8], "little")
    return size - 8 - header, size // 2 - 8 - header


# name: (break the directory, exception, the message after "config: model: ", {d}: the directory)
CASES = {
    "missing weights": (
        lambda d: (d / WEIGHTS).unlink(), FileNotFoundError,
        "{d} has config.json but no weights (no model.safetensors or model.safetensors.index.json); "
        "download or save the model again"),
    "pytorch_model.bin only": (
        lambda d: (d / WEIGHTS).rename(d / "pytorch_model.bin"), FileNotFoundError,
        "{d} holds pytorch_model.bin but no model.safetensors; preftune loads safetensors "
        "weights only: convert it (from_pretrained, then save_pretrained with "
        "safe_serialization=True)"),
    "truncated safetensors": (
        truncate, ValueError,
        "{d}/model.safetensors is truncated (header says {need:,} bytes of tensors, the file "
        "holds {held:,}); download or save it again"),
    "corrupt header": (
        corrupt_header, ValueError,
        "{d}/model.safetensors has a corrupt header (not valid JSON: Expecting value: line 1 column 1 "
        "(char 0)); download or save it again"),
    "sharded index missing a shard": (
        missing_shard, FileNotFoundError,
        "{d}/model-00002-of-00002.safetensors is missing (model.safetensors.index.json "
        "lists 2 shards, 1 absent); download or save the model again"),
    "config.json not JSON": (
        lambda d: (d / "config.json").write_text('{"model_type": "llama",'), ValueError,
        "{d}/config.json is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 24 (char 23)); fix it or save the model again"),
    "unknown model_type": (
        lambda d: (d / "config.json").write_text('{"model_type": "no_such_model"}'), ValueError,
        "{d}/config.json cannot be read by transformers (The checkpoint you are trying to load has "
        "model type `no_such_model` but Transformers does not recognize this architecture.); fix it "
        "or save the model again"),
    "broken tokenizer": (
        lambda d: (d / "tokenizer.json").write_text('{"model": '), ValueError,
        "{d}/tokenizer.json cannot be read as a tokenizer (EOF while parsing a value at line 1 column "
        "10); save the tokenizer again"),
}


def broken(pristine: Path, tmp: Path, case: str) -> tuple[Path, type, str]:
    """A copy of the tiny model broken as ``case`` says, the exception and the message it must give."""
    d = tmp / case.replace(" ", "_").replace(".", "_")
    shutil.copytree(pristine, d)
    need, held = half_size(d)
    fn, error, message = CASES[case]
    fn(d)
    return d, error, message.format(d=d, need=need, held=held)


def assert_one_line(err: pytest.ExceptionInfo, expected: str) -> None:
    assert str(err.value) == expected
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_refuses_a_broken_model_before_anything(pristine, tmp_path, case):
    from preftune.methods.dpo import train_dpo

    d, error, message = broken(pristine, tmp_path, case)
    with pytest.raises(error) as err:
        train_dpo(base_config(tmp_path, model=str(d)))
    assert_one_line(err, f"config: model: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_cli_prints_one_line(pristine, tmp_path, case, capsys):
    d, _, message = broken(pristine, tmp_path, case)
    argv = ["dpo", "--train_file", base_config(tmp_path)["train_file"], "--model", str(d),
            "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()  # the tiny model's save bars
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"preftune dpo: error: config: model: {message}"]
    assert not (tmp_path / "out").exists()


def test_truncated_weights_in_a_real_process(pristine, tmp_path):
    """The issue's case end to end: no SafetensorError traceback, one line, exit status 2, nothing written."""
    d, _, message = broken(pristine, tmp_path, "truncated safetensors")
    proc = subprocess.run([sys.executable, "-m", "preftune", "dpo",
                           "--train_file", base_config(tmp_path)["train_file"], "--model", str(d),
                           "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"preftune dpo: error: config: model: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "case"), [("reference_model", "truncated safetensors"),
                                         ("tokenizer", "broken tokenizer")])
def test_reference_model_and_tokenizer_are_checked(pristine, tmp_path, key, case):
    from preftune.methods.dpo import train_dpo

    d, _, message = broken(pristine, tmp_path, case)
    with pytest.raises(ValueError) as err:
        train_dpo(base_config(tmp_path, **{key: str(d)}))
    assert_one_line(err, f"config: {key}: {message}")
    assert not (tmp_path / "out").exists()


def test_ppo_reward_model_is_checked(pristine, tmp_path, capsys):
    from preftune.methods.ppo import train_ppo

    d, _, message = broken(pristine, tmp_path, "sharded index missing a shard")
    config = {"model": str(pristine), "output_dir": str(tmp_path / "out"), "reward_model": str(d),
              "rollout_batch_size": 8, "num_rollouts": 1, "batch_size": 4, "progress_bar": False}
    with pytest.raises(FileNotFoundError) as err:
        train_ppo(config, prompts=["w1 w2", "w3"])
    assert_one_line(err, f"config: reward_model: {message}")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "w1 w2"}\n')
    capsys.readouterr()
    assert main(["ppo", "--train_file", str(tmp_path / "prompts.jsonl"), "--model", str(pristine),
                 "--reward_model", str(d), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"preftune ppo: error: config: reward_model: {message}"]
    assert not (tmp_path / "out").exists()


def test_reward_training_checks_its_model(pristine, tmp_path):
    from preftune.methods.reward import train_reward

    d, _, message = broken(pristine, tmp_path, "missing weights")
    config = base_config(tmp_path, model=str(d))
    with pytest.raises(FileNotFoundError) as err:
        train_reward({k: config[k] for k in ("model", "train_file", "output_dir")})
    assert_one_line(err, f"config: model: {message}")
    assert not (tmp_path / "out").exists()


def test_iterate_judge_is_checked(pristine, tmp_path, capsys):
    from preftune.methods.iterate import train_iterative

    d, _, message = broken(pristine, tmp_path, "truncated safetensors")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "w1 w2"}\n')
    values = {"model": str(pristine), "train_file": str(tmp_path / "prompts.jsonl"), "judge": str(d),
              "output_dir": str(tmp_path / "out")}
    with pytest.raises(ValueError) as err:
        train_iterative(values)
    assert_one_line(err, f"config: judge: {message}")
    with pytest.raises(ValueError) as err:  # the held-out reward too
        train_iterative({**values, "judge": "sentiment", "eval_file": values["train_file"],
                         "eval_reward": str(d)})
    assert_one_line(err, f"config: eval_reward: {message}")
    capsys.readouterr()
    assert main(["iterate", *[a for k, v in values.items() for a in (f"--{k}", v)]]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"preftune iterate: error: config: judge: {message}"]
    assert not (tmp_path / "out").exists()


def test_eval_judge_is_checked(pristine, tmp_path, capsys):
    d, _, message = broken(pristine, tmp_path, "corrupt header")
    argv = ["eval", "--models", str(pristine), "--baseline", str(pristine), "--judge", str(d),
            "--num_prompts", "2", "--num_samples", "2", "--max_new_tokens", "4",
            "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"preftune eval: error: eval: judge: {message}"]
    assert not (tmp_path / "out").exists()


def test_eval_models_are_checked_before_loading(pristine, tmp_path, capsys):
    """A broken --models directory: one line naming the flag, before any model loads."""
    d, _, message = broken(pristine, tmp_path, "truncated safetensors")
    argv = ["eval", "--models", str(d), "--baseline", str(pristine), "--judge", "sentiment",
            "--num_prompts", "2", "--num_samples", "2", "--max_new_tokens", "4",
            "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"preftune eval: error: eval: models: {message}"]
    assert not (tmp_path / "out").exists()


def test_check_eval_paths_names_the_flag(pristine, tmp_path):
    from preftune.eval.config import EvalConfig
    from preftune.eval.inputs import check_eval_paths

    d, _, message = broken(pristine, tmp_path, "missing weights")
    check_eval_paths(EvalConfig(models=[str(pristine), "embedded"], reference=str(pristine)))
    for flag, values in (("models", {"models": [str(pristine), str(d)]}), ("baseline", {"baseline": str(d)}),
                         ("reference", {"reference": str(d)})):
        with pytest.raises(FileNotFoundError) as err:
            check_eval_paths(EvalConfig(**{"models": [str(pristine)], **values}))
        assert_one_line(err, f"eval: {flag}: {message}")
    with pytest.raises(FileNotFoundError) as err:
        check_eval_paths(EvalConfig(models=[str(pristine)], judge=str(d)))
    assert_one_line(err, f"eval: judge: {message}")


def test_loaders_explain_a_broken_directory(pristine, tmp_path):
    d, _, message = broken(pristine, tmp_path, "truncated safetensors")
    with pytest.raises(ValueError) as err:
        load_model(str(d))
    assert_one_line(err, f"model: {message}")
    d, _, message = broken(pristine, tmp_path, "broken tokenizer")
    with pytest.raises(ValueError) as err:
        load_tokenizer(str(d))
    assert_one_line(err, f"tokenizer: {message}")


def test_good_directories_pass(pristine, tmp_path):
    from preftune.engine.setup import check_run_paths
    from preftune.methods.dpo import DPOConfig

    shutil.copytree(pristine, tmp_path / "sharded")
    shard(tmp_path / "sharded")
    for name in (str(pristine), str(tmp_path / "sharded"), "embedded"):
        check_model_path("model", name, with_tokenizer=True)
    check_model_path("model", "some-org/some-model")  # a hub id: not checked (no network)
    check_run_paths(DPOConfig(train_file=__file__))  # the embedded model
    check_run_paths(DPOConfig(model=str(tmp_path / "sharded"), reference_model=str(pristine),
                              tokenizer=str(pristine), train_file=__file__))
    assert load_model(str(tmp_path / "sharded")).config.num_hidden_layers == 2


def test_shard_lacking_a_tensor_of_the_index(pristine, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(pristine, d)
    shard(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = SHARDS[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        check_model_path("model", str(d))
    assert_one_line(err, f"config: model: {d}/{SHARDS[0]} lacks tensor 'extra.weight' that "
                         "model.safetensors.index.json places in it; download or save the model again")
