"""Data formats, file types and malformed-row errors."""

from __future__ import annotations

import gzip
import json

import pytest

from helpers import SHARED_DATA, tiny_tokenizer
from preftune.data.formats import load_preference_data, split_implicit_prompt
from preftune.data.io import DataError

ROWS = [
    {"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"},
    {"prompt": "w5", "chosen": " w6 w7", "rejected": " w8", "preference": 0.7},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_standard_jsonl_and_preference(tmp_path):
    data = load_preference_data(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert [p.prompt for p in data.pairs] == ["w1 w2", "w5"]
    assert [p.preference for p in data.pairs] == [1.0, 0.7]
    assert data.pairs[1].origin.endswith("d.jsonl: row 2")


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "dataset", "jsonl.gz"])
def test_file_types_agree(tmp_path, kind):
    expected = load_preference_data(write_jsonl(tmp_path / "d.jsonl", ROWS)).pairs
    path = tmp_path / f"d.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        import pandas as pd

        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif kind == "parquet":
        import pandas as pd

        pd.DataFrame(ROWS).to_parquet(path)
    elif kind == "dataset":
        import datasets

        rows = [{**r, "preference": r.get("preference", 1.0)} for r in ROWS]
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
    got = load_preference_data(path).pairs
    assert [(p.prompt, p.chosen, p.rejected, p.preference) for p in got] == [
        (p.prompt, p.chosen, p.rejected, p.preference) for p in expected
    ]


def test_implicit_prompt_split_on_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Fine, thanks."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Go away."
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (c, r) == (" Fine, thanks.", " Go away.")
    # the split is at the last shared marker even if the completions share a first word
    prompt, c, r = split_implicit_prompt(chosen[:-7] + "X", chosen[:-7] + "Y")
    assert prompt.endswith("Assistant:") and c.startswith(" Fine")
    # other text: longest common prefix
    assert split_implicit_prompt("abc def", "abc xyz") == ("abc ", "def", "xyz")


def test_implicit_prompt_on_real_hh_rows():
    path = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (CI has ../shared beside the clone)")
    data = load_preference_data(path)  # 4 pairs have an empty chosen reply: data, not errors
    assert len(data.pairs) == 2312 and not data.skipped
    assert [p.origin.rsplit(" ", 1)[1] for p in data.pairs if p.chosen == ""] == ["87", "517", "926", "1104"]
    for p in data.pairs[:200]:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in p.chosen[:1] and p.chosen != p.rejected


def test_conversational_rows_use_chat_template(tmp_path):
    tok = tiny_tokenizer()
    rows = [
        {"prompt": [{"role": "user", "content": "w1 w2"}],
         "chosen": [{"role": "assistant", "content": "w3"}],
         "rejected": [{"role": "assistant", "content": "w4"}]},
        {"chosen": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w5"}],
         "rejected": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w6"}]},
    ]
    data = load_preference_data(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer=tok)
    first, second = data.pairs
    assert first.prompt == "<user> w1 w2 <assistant> "
    assert (first.chosen, first.rejected) == ("w3 ", "w4 ")
    assert (second.prompt, second.chosen, second.rejected) == ("<user> w1 <assistant> ", "w5 ", "w6 ")
    with pytest.raises(DataError, match="no chat template"):
        load_preference_data(tmp_path / "c.jsonl", tokenizer=None)


def test_unpaired_rows(tmp_path):
    rows = [{"prompt": "w1", "completion": " w2", "label": True},
            {"prompt": "w3", "completion": " w4", "label": False}]
    data = load_preference_data(write_jsonl(tmp_path / "u.jsonl", rows), kind="unpaired")
    assert [(e.prompt, e.label) for e in data.unpaired] == [("w1", True), ("w3", False)]
    with pytest.raises(DataError, match=r"row 2: field 'label': missing"):
        load_preference_data(write_jsonl(tmp_path / "v.jsonl",
                                         [rows[0], {"prompt": "w1", "completion": " w2"}]), kind="unpaired")


BAD_ROWS = [
    ({"prompt": "w1", "rejected": " w2"}, "field 'chosen': missing"),
    ({"prompt": "w1", "chosen": 3, "rejected": " w2"}, "field 'chosen': expected a string, got int"),
    ({"prompt": "w1", "chosen": " w2", "rejected": " w3", "preference": 1.5},
     "field 'preference': must be in"),
    ({"prompt": "w1", "chosen": " w2", "rejected": " w3", "preference": "high"},
     "field 'preference': expected a number"),
    ({"prompt": "w1", "chosen": " w2", "rejected": " w3", "preference": float("nan")},
     "field 'preference': must be a finite number, got nan"),
    ("{not json", "unparsable JSON line"),
    ("[1, 2]", "expected an object with fields, got list"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_malformed_row_gives_one_line_error(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: row 2") and message in text


def test_skip_bad_rows_counts_and_reports(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{oops", {"prompt": "w1"}, ROWS[1]])
    data = load_preference_data(path, skip_bad_rows=True)
    assert len(data.pairs) == 2
    assert len(data.skipped) == 2 and "row 2" in data.skipped[0] and "row 3" in data.skipped[1]


def test_csv_bad_row_names_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nw1, w2, w3\nw1,,w3\n")
    with pytest.raises(DataError, match=r"d.csv: row 2: field 'chosen'"):
        load_preference_data(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_preference_data(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_preference_data(tmp_path / "d.txt")
