"""Every reader names the field that is wrong: prompts (ppo, iterate, eval), pairs (dpo, reward,
eval --pairs), unpaired (KTO), SFT, judgments (aggregate) and candidate pools (select); text that
UTF-8 cannot encode (a lone surrogate) is a bad row like undecodable bytes."""

from __future__ import annotations

import json

import pytest

from helpers import tiny_tokenizer
from preftune.cli import main
from preftune.data.formats import load_preference_data, read_prompts
from preftune.data.io import DataError, read_rows
from preftune.doctor.annotators import read_judgments

PAIR = {"prompt": "w1", "chosen": "w2", "rejected": "w3"}
UNPAIRED = {"prompt": "w1", "completion": "w2", "label": True}
SFT = {"prompt": "w1", "completion": "w2"}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def error_of(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(("row", "field", "says"), [
    ({"text": "w1"}, "prompt", "missing (a prompt file's rows need a 'prompt', or 'chosen' and 'rejected')"),
    ({"prompt": 5}, "prompt", "expected a non-empty string or a list of messages"),
    ({"prompt": "  "}, "prompt", "expected a non-empty string or a list of messages"),
    ({"prompt": [{"role": "user", "content": "w1"}]}, "prompt", "the tokenizer has no chat template"),
    ({"prompt": "w1", "images": ["a.png"]}, "images[0]", "no such image file"),
    ({"chosen": "w1", "rejected": 4}, "rejected", "expected a string"),
])
def test_prompt_reader_names_the_field(tmp_path, row, field, says):
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "w1"}, row])
    message = error_of(lambda: read_prompts(path, None))
    assert message.startswith(f"{path}: row 2: field {field!r}: ") and says in message


def test_prompt_reader_takes_prompts_of_every_kind_of_row(tmp_path):
    path = write(tmp_path / "prompts.jsonl", [
        {"prompt": "w1"},
        {"prompt": "w4", "chosen": "w2", "level": 3},  # a prompt and one reply: the prompt is all it needs
        {"chosen": "\n\nHuman: w5\n\nAssistant: w6", "rejected": "\n\nHuman: w5\n\nAssistant: w7"},
        {"prompt": [{"role": "user", "content": "w8"}]},
        {"text": "w9"},
    ])
    tok = tiny_tokenizer()
    prompts = read_prompts(path, tok, skip_bad_rows=True)  # the last row has no prompt: dropped
    rendered = tok.apply_chat_template([{"role": "user", "content": "w8"}], tokenize=False,
                                       add_generation_prompt=True)
    assert [p.text for p in prompts] == ["w1", "w4", "\n\nHuman: w5\n\nAssistant:", rendered]
    # the other columns of a row travel with its prompt (a judge may take them), a pair's answers do not
    assert [dict(p.columns) for p in prompts][:3] == [{}, {"level": 3}, {}]
    assert prompts[3].origin == f"{path}: row 4"


def test_ppo_names_the_prompt_field_in_one_line(tmp_path, capsys):
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "Once"}, {"question": "Why?"}])
    code = main(["ppo", "--train_file", path, "--reward_fn", "sentiment",
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"preftune ppo: error: {path}: row 2: field 'prompt': missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("row", "field"), [
    ({"prompt": "w1", "chosen": "w2"}, "rejected"),
    ({"prompt": "w1", "rejected": "w2"}, "chosen"),
    ({**PAIR, "chosen": 3}, "chosen"),
    ({**PAIR, "prompt": 3}, "prompt"),
    ({**PAIR, "preference": "high"}, "preference"),
    ({**PAIR, "preference": 1.5}, "preference"),
    ({**PAIR, "margin": "x"}, "margin"),
])
def test_pair_reader_names_the_field(tmp_path, row, field):
    """dpo, reward and ``eval --pairs`` read pairs through :func:`load_preference_data`."""
    path = write(tmp_path / "pairs.jsonl", [PAIR, row])
    assert error_of(lambda: load_preference_data(path)).startswith(f"{path}: row 2: field {field!r}: ")


@pytest.mark.parametrize(("row", "field"), [
    ({"prompt": "w1", "completion": "w2"}, "label"),
    ({"prompt": "w1", "label": True}, "completion"),
    ({"completion": "w2", "label": True}, "prompt"),
    ({**UNPAIRED, "label": 2}, "label"),
])
def test_unpaired_reader_names_the_field(tmp_path, row, field):
    path = write(tmp_path / "kto.jsonl", [UNPAIRED, row])
    message = error_of(lambda: load_preference_data(path, kind="unpaired"))
    assert message.startswith(f"{path}: row 2: field {field!r}: ")


@pytest.mark.parametrize(("row", "field"), [
    ({"prompt": "w1"}, "completion"),
    ({"completion": "w1"}, "prompt"),
    ({"messages": "w1"}, "messages"),
    ({"messages": [{"role": "user", "content": "w1"}]}, "messages"),
])
def test_sft_reader_names_the_field(tmp_path, row, field):
    path = write(tmp_path / "sft.jsonl", [SFT, row])
    message = error_of(lambda: load_preference_data(path, kind="sft", tokenizer=tiny_tokenizer()))
    assert message.startswith(f"{path}: row 2: field {field!r}: ")


def test_eval_pairs_name_the_field_in_one_line(tmp_path, capsys):
    path = write(tmp_path / "pairs.jsonl", [PAIR, {"prompt": "w1", "chosen": "w2"}])
    code = main(["eval", "--model", "embedded", "--pairs", path, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{path}: row 2: field 'rejected': missing" in err


def test_aggregate_names_the_field(tmp_path):
    judged = {**PAIR, "annotator": "a"}
    path = write(tmp_path / "judgments.jsonl", [judged, {**PAIR}])
    with pytest.raises(ValueError, match=r"row 2: field 'annotator': missing"):
        read_judgments(path)
    path = write(tmp_path / "judgments2.jsonl", [judged, {"prompt": "w1", "chosen": "w2", "annotator": "b"}])
    assert read_judgments(path).bad_rows == [f"{path}: row 2: field 'rejected': missing"]


def test_select_counts_bad_rows_by_field(tmp_path):
    from preftune.doctor.selection import select_file

    rows = [{"prompt": f"Once upon a time {i}", "chosen": " a cat", "rejected": " a dog"} for i in range(4)]
    path = write(tmp_path / "pool.jsonl", [*rows, {"prompt": "Once", "chosen": " a bird"}])
    done = select_file(path, tmp_path / "picked.jsonl", budget=2, model="embedded")
    assert done["bad_rows"] == [f"{path}: row 5: field 'rejected': missing"]


# -- text that UTF-8 cannot encode ------------------------------------------------------------
SURROGATE_ROW = '{"prompt": "Once", "chosen": "a \\ud800 cat", "rejected": "a dog"}\n'


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_lone_surrogate_is_a_bad_row_naming_its_field(tmp_path, suffix):
    good = {"prompt": "Once", "chosen": "\\ud83d\\ude00 a cat", "rejected": "a dog"}  # a whole pair: an emoji
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps(good).replace("\\\\", "\\") + "\n" + SURROGATE_ROW, encoding="utf-8")
    elif suffix == ".json":
        path.write_text("[" + json.dumps(good).replace("\\\\", "\\") + "," + SURROGATE_ROW + "]",
                        encoding="utf-8")
    else:
        path.write_text('prompt,chosen,rejected\nOnce,a cat,a dog\nOnce,"[""\\ud800""]",a dog\n',
                        encoding="utf-8")
    rows = list(read_rows(path))
    assert isinstance(rows[0].fields, dict)
    message = error_of(lambda: load_preference_data(path))
    assert message.startswith(f"{path}: row 2: field 'chosen': holds U+D800, a lone surrogate that UTF-8 "
                              "cannot encode")
    assert message.endswith("to skip such rows, set skip_bad_rows: true (--skip_bad_rows true)")
    if suffix == ".jsonl":
        assert rows[0].fields["chosen"] == "\U0001f600 a cat"  # a surrogate pair is one character: fine


def test_lone_surrogate_is_one_line_from_the_cli_or_skipped_and_counted(tmp_path, capsys, caplog):
    path = tmp_path / "pairs.jsonl"
    rows = [json.dumps({"prompt": f"Once {i}", "chosen": " a cat", "rejected": " a dog"}) + "\n"
            for i in range(4)]
    path.write_text("".join(rows) + SURROGATE_ROW, encoding="utf-8")
    base = ["dpo", "--train_file", str(path), "--max_steps", "1", "--progress_bar", "false"]
    code = main([*base, "--output_dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "row 5: field 'chosen': holds U+D800" in err
    assert not (tmp_path / "a").exists()
    assert main([*base, "--output_dir", str(tmp_path / "b"), "--skip_bad_rows", "true"]) == 0
    assert "row 5: field 'chosen': holds U+D800" in caplog.text  # the data summary's skipped row


def test_lone_surrogate_in_a_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Once"}\n{"prompt": "x \\udfff y"}\n', encoding="utf-8")
    message = error_of(lambda: read_prompts(path, None))
    assert message.startswith(f"{path}: row 2: field 'prompt': holds U+DFFF")
    assert [p.text for p in read_prompts(path, None, skip_bad_rows=True)] == ["Once"]


def test_eval_and_iterate_take_skip_bad_rows(tmp_path):
    """The skip hint of a bad prompt row names a key that ``eval`` and ``iterate`` accept."""
    from preftune.engine.config import load_config
    from preftune.eval.evaluate import load_eval_config
    from preftune.methods.iterate import IterateConfig

    assert load_eval_config(["--models", "embedded", "--skip_bad_rows", "true"]).skip_bad_rows is True
    assert load_eval_config(["--models", "embedded", "--skip_bad_rows", "false"]).skip_bad_rows is False
    with pytest.raises(SystemExit):  # argparse's one line: invalid true_or_false value
        load_eval_config(["--models", "embedded", "--skip_bad_rows", "sometimes"])
    config = load_config(IterateConfig, None, ["--train_file", "p.jsonl", "--judge", "sentiment",
                                               "--skip_bad_rows", "true"])
    assert config.skip_bad_rows is True


def test_a_directory_that_is_not_a_saved_dataset_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()  # no data file in it (a folder of .txt files is a text dataset)
    message = error_of(lambda: load_preference_data(tmp_path / "notes"))
    assert message.startswith(f"{tmp_path / 'notes'}: a directory, but neither a saved dataset "
                              "(save_to_disk) nor a dataset repository") and "\n" not in message
