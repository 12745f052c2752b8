"""``final/README.md``: a model card the hub reads (YAML header) and a reader understands without the
run directory: method and citation, the settings that changed the result, the run's figures, the
framework versions and a command that reproduces it."""

from __future__ import annotations

import shlex

import yaml

from helpers import base_config
from preftune.engine.config import parse_overrides
from preftune.methods.dpo import train_dpo


def test_a_dpo_run_writes_a_model_card_that_reproduces_it(tmp_path):
    config = base_config(tmp_path, max_steps=2, batch_size=4, loss_params={"beta": 0.2})
    run = train_dpo(config)
    text = (run.train.final_dir / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert {"preftune", "dpo", "sigmoid"} <= set(header["tags"])
    assert "base_model" not in header and "license" not in header  # a local model: neither is known
    for section in ("## Settings that changed the result", "## Training (the last logged row)",
                    "## Reproduce", "## Framework versions", "## Citation"):
        assert section in text, section
    assert "rafailov2023direct" in text and "- torch " in text and "| loss |" in text
    command = text.split("## Reproduce")[1].split("```bash\n")[1].split("\n")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["preftune", "dpo"]
    given = parse_overrides(argv[2:])  # the command names every setting that differs from the defaults
    assert given["loss_params"] == {"beta": 0.2} and given["max_steps"] == 2 and given["batch_size"] == 4
    assert given["train_file"] == config["train_file"] and given["model"] == config["model"]
    # where it wrote and what it logged do not change the result
    assert "output_dir" not in given and "progress_bar" not in given


def test_the_embedded_model_card_names_its_license(tmp_path):
    from helpers import write_pairs

    write_pairs(tmp_path / "train.jsonl", n=8)
    run = train_dpo({"model": "embedded", "train_file": str(tmp_path / "train.jsonl"), "max_steps": 1,
                     "batch_size": 4, "output_dir": str(tmp_path / "out"), "progress_bar": False,
                     "gradient_checkpointing": False})
    text = (run.train.final_dir / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["license"] == "mit"
    assert "stories260K, the model embedded in preftune" in text
