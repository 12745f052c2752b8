"""Dataset repositories as data: a directory laid out as a hub dataset repository (parquet shards under
``data/``) trains with ``train_file: <dir>`` and the split keys, TRL's ``dataset_name`` /
``dataset_test_split`` map to them, and a hub id that cannot be reached is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import base_config, write_pairs
from preftune.data.formats import read_prompts
from preftune.data.io import DataError, read_rows
from preftune.data.sources import Source
from preftune.methods.dpo import train_dpo


def hub_layout(tmp_path, train: int = 24, test: int = 8):
    """``repo/data/{train,test}-00000-of-00001.parquet``, as `datasets.push_to_hub` lays them out."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        rows = [json.loads(line) for line in write_pairs(tmp_path / f"{split}.jsonl", n=n, seed=seed)
                .read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), repo / "data" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train\n    path: data/train-*\n"
                                    "  - split: test\n    path: data/test-*\n---\n")
    return repo


def test_a_hub_layout_directory_trains_with_its_splits(tmp_path):
    repo = hub_layout(tmp_path)
    run = train_dpo(base_config(tmp_path, train_file=str(repo), eval_split="test", max_steps=2, batch_size=4))
    assert len(run.data.train.pairs) == 24 and len(run.data.eval.pairs) == 8
    assert [r["step"] for r in run.train.eval_history][-1] == 2  # evaluated on the test split
    again = train_dpo(base_config(tmp_path, train_file=str(repo), eval_split="test", max_steps=2,
                                  batch_size=4, output_dir=str(tmp_path / "again")))
    assert again.train.history[-1]["loss"] == run.train.history[-1]["loss"]


def test_trl_dataset_keys_map_to_the_split_keys(tmp_path):
    repo = hub_layout(tmp_path)
    config = {k: v for k, v in base_config(tmp_path, max_steps=1, batch_size=4).items() if k != "train_file"}
    run = train_dpo({**config, "dataset_name": str(repo), "dataset_train_split": "train",
                     "dataset_test_split": "test"})
    assert len(run.data.train.pairs) == 24 and len(run.data.eval.pairs) == 8


def test_a_split_that_is_not_there_is_one_line(tmp_path):
    repo = hub_layout(tmp_path)
    with pytest.raises(DataError) as error:
        list(read_rows(Source(str(repo), "validation")))
    message = str(error.value)
    assert message.startswith(f"{repo} [validation]: cannot be read as a dataset repository") or \
        message.startswith(f"{repo} [validation]: a directory, but neither")
    assert "validation" in message and "\n" not in message


def test_prompts_come_from_a_repository_too(tmp_path):
    repo = hub_layout(tmp_path, train=5)
    # preference rows give their prompts (PPO, iterate)
    assert len(read_prompts([Source(str(repo))], None)) == 5


def test_a_hub_id_without_the_network_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "preftune", "dpo", "--train_file", "nobody/no-such-dataset",
                           "--output_dir", str(tmp_path / "out"), "--max_steps", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("preftune dpo: error:")]
    assert "Traceback" not in proc.stderr
    assert line.startswith("preftune dpo: error: nobody/no-such-dataset: cannot be read as a dataset "
                           "repository")
    assert "HF_DATASETS_OFFLINE" in line and not (tmp_path / "out" / "final").exists()


def test_train_split_and_dataset_config_choose_what_is_read(tmp_path):
    repo = hub_layout(tmp_path)
    run = train_dpo(base_config(tmp_path, train_file=str(repo), train_split="test", max_steps=1,
                                batch_size=4))
    assert len(run.data.train.pairs) == 8  # the test split's rows, not train's 24
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files:\n"
                                    "  - split: train\n    path: data/test-*\n"
                                    "- config_name: big\n  data_files:\n"
                                    "  - split: train\n    path: data/train-*\n---\n")
    sizes = {name: sum(1 for _ in read_rows(Source(str(repo), "train", name))) for name in ("small", "big")}
    assert sizes == {"small": 8, "big": 24}


def test_a_split_of_a_saved_dataset_dict(tmp_path):
    import datasets

    rows = [json.loads(x) for x in write_pairs(tmp_path / "p.jsonl", n=6).read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "saved"))
    assert sum(1 for _ in read_rows(Source(str(tmp_path / "saved"), "test"))) == 2
    assert sum(1 for _ in read_rows(Source(str(tmp_path / "saved")))) == 4


def test_a_split_of_one_file_is_one_line_not_the_whole_file(tmp_path):
    """eval_split with a .jsonl train_file would otherwise evaluate on the training rows."""
    with pytest.raises(DataError, match="a split or dataset_config names part of a dataset repository"):
        train_dpo(base_config(tmp_path, eval_split="test", max_steps=1, batch_size=4))
