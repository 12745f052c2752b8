"""Data faults (issue 13, part 1): each bad or unusual input, as a small file, gets the one line it should."""

from __future__ import annotations

import gzip
import json
import zlib
from types import SimpleNamespace

import pytest

from helpers import tiny_tokenizer
from preftune.data.formats import load_preference_data
from preftune.data.io import SKIP_HINT, DataError
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.engine.setup import load_data

BOS, EOS = 1, 2
TOK = tiny_tokenizer()
GOOD = {"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(train, eval_file=None, **overrides):
    """The settings ``load_data`` reads, without the rest of a run's config."""
    values = {"train_files": [str(train)], "eval_files": [str(eval_file)] if eval_file else [],
              "skip_bad_rows": False, "max_length": 64, "max_prompt_length": 32,
              "max_completion_length": None}
    return SimpleNamespace(**{**values, **overrides})


def msg(role, content):
    return {"role": role, "content": content}


# ---- empty completions: data, trained on EOS alone, counted --------------------------------------

EMPTY_CHOSEN = {
    "standard": {"prompt": "w1 w2", "chosen": " ", "rejected": " w4"},
    "conversational": {"prompt": [msg("user", "w1 w2")], "chosen": [msg("assistant", "")],
                       "rejected": [msg("assistant", "w4")]},
    "implicit prompt": {"chosen": "\n\nHuman: w1 w2\n\nAssistant: ",
                        "rejected": "\n\nHuman: w1 w2\n\nAssistant: w4"},
}


@pytest.mark.parametrize("form", list(EMPTY_CHOSEN))
def test_empty_completion_is_eos_alone_and_counted(tmp_path, form):
    path = write_jsonl(tmp_path / "e.jsonl", [EMPTY_CHOSEN[form]])
    (pair,) = load_preference_data(path, tokenizer=TOK).pairs
    assert pair.chosen == ""
    data = PairTokenizer(TOK, Budgets()).tokenize([pair])
    (p,) = data.pairs
    assert p.chosen_ids == (EOS,) and p.rejected_ids == (7, EOS)  # w4, EOS
    assert data.empty_completions == 1
    bundle = load_data(config(path), TOK)
    assert bundle.summary() == "1 training pair (1 empty completion trained as EOS alone)"


def test_both_completions_empty_is_an_equal_pair_dropped(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD, {"prompt": "w1", "chosen": "", "rejected": "  "}])
    data = load_data(config(path), TOK).train
    assert (len(data.pairs), data.dropped_equal, data.empty_completions) == (1, 1, 0)


# ---- chosen == rejected: no gradient, dropped and counted -----------------------------------------


def test_chosen_equal_to_rejected_is_dropped_and_counted(tmp_path):
    same = {"prompt": "w1", "chosen": " w5 w6", "rejected": " w5 w6"}
    train = write_jsonl(tmp_path / "t.jsonl", [GOOD, same, GOOD, same])
    held_out = write_jsonl(tmp_path / "v.jsonl", [same, GOOD])
    bundle = load_data(config(train, held_out), TOK)
    assert (len(bundle.train.pairs), bundle.train.dropped_equal, bundle.train.dropped_identical) == (2, 2, 0)
    assert bundle.train.first_dropped == f"{train}: row 2: chosen == rejected"
    assert bundle.summary() == ("2 training pairs (2 dropped as chosen == rejected); "
                                "1 eval pair (1 dropped as chosen == rejected)")


# ---- no usable rows: the count of each reason and the first example -------------------------------


def test_no_usable_rows_counts_each_reason_with_the_first_example(tmp_path):
    rows = [{"prompt": "w1", "rejected": " w2"}, "{oops", {"prompt": "w1", "rejected": " w3"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preference_data(path, skip_bad_rows=True)
    assert str(err.value) == (
        f"{path}: no usable rows: 3 bad rows skipped (2 × field 'chosen': missing, "
        "1 × unparsable JSON line (Expecting property name enclosed in double quotes)); "
        f"first: {path}: row 1: field 'chosen': missing")


def test_no_usable_rows_after_dropping_pairs(tmp_path):
    rows = ["{oops", {"prompt": "w1", "chosen": " w2", "rejected": " w2"},
            {"prompt": "w1", "chosen": "", "rejected": ""}]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_data(config(path, skip_bad_rows=True), TOK)
    assert str(err.value) == (
        f"{path}: no usable rows: 1 bad row skipped (1 × unparsable JSON line "
        f"(Expecting property name enclosed in double quotes)); 2 pairs dropped (2 × chosen == rejected); "
        f"first: {path}: row 1: "
        "unparsable JSON line (Expecting property name enclosed in double quotes)")


# ---- the skip hint ends a bad-row error -----------------------------------------------------------


def test_bad_row_error_ends_with_how_to_skip(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "w1", "chosen": 3, "rejected": " w2"}])
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert str(err.value) == f"{path}: row 2: field 'chosen': expected a string, got int; {SKIP_HINT}"
    assert SKIP_HINT == "to skip such rows, set skip_bad_rows: true (--skip_bad_rows true)"
    skipped = load_preference_data(path, skip_bad_rows=True).skipped  # the counted message has no hint
    assert skipped == [f"{path}: row 2: field 'chosen': expected a string, got int"]


# ---- text that is not UTF-8 -----------------------------------------------------------------------


def test_undecodable_byte_names_row_and_field(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD).encode(), json.dumps(GOOD).encode(),
             b'{"prompt": "w1", "chosen": " caf\xe9", "rejected": " w2"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert str(err.value).startswith(f"{path}: row 3: field 'chosen': not valid UTF-8 (byte 0xe9)")


def test_binary_file_names_the_row_of_the_first_undecodable_byte(tmp_path):
    path = tmp_path / "model.jsonl"
    # no newline after row 3
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + bytes(range(11, 256)) * 2)
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert str(err.value).startswith(
        f"{path}: row 3: not valid UTF-8 (byte 0x80 at character 118 of the line)")


def test_undecodable_csv_cell_names_row_and_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\nw1, w2, w3\nw1, w2, caf\xe9\n")
    with pytest.raises(DataError, match=r"d.csv: row 2: field 'rejected': not valid UTF-8 \(byte 0xe9\)"):
        load_preference_data(path)


# ---- numbers: NaN, inf and out of range are errors naming the field --------------------------------

BAD_NUMBERS = [
    ('"preference": NaN', "field 'preference': must be a finite number, got nan"),
    ('"preference": Infinity', "field 'preference': must be a finite number, got inf"),
    ('"preference": -0.5', "field 'preference': must be in [0, 1], got -0.5"),
    ('"margin": NaN', "field 'margin': must be a finite number, got nan"),
    ('"margin": -Infinity', "field 'margin': must be a finite number, got -inf"),
]


@pytest.mark.parametrize("number,message", BAD_NUMBERS, ids=[n for n, _ in BAD_NUMBERS])
def test_non_finite_or_out_of_range_number_is_an_error(tmp_path, number, message):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "w1", "chosen": " w2", "rejected": " w3", '
                    + number + "}\n")
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert str(err.value).startswith(f"{path}: row 2: {message}")


@pytest.mark.parametrize("label,message", [
    ("NaN", "field 'label': must be true/false (or 1/0), got nan"),
    ("2", "field 'label': must be true/false (or 1/0), got 2"),
    ('"yes"', "field 'label': expected true or false, got 'yes'"),
], ids=["nan", "2", "yes"])
def test_bad_label_is_an_error(tmp_path, label, message):
    path = tmp_path / "u.jsonl"
    path.write_text('{"prompt": "w1", "completion": " w2", "label": 1}\n'
                    '{"prompt": "w1", "completion": " w2", "label": ' + label + "}\n")
    with pytest.raises(DataError) as err:
        load_preference_data(path, kind="unpaired")
    assert str(err.value).startswith(f"{path}: row 2: {message}")
    # 1 is true
    assert load_preference_data(path, kind="unpaired", skip_bad_rows=True).unpaired[0].label is True


def test_columnar_nan_is_an_error_but_an_empty_cell_is_absent(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected,preference\nw1, w2, w3,\nw1, w2, w3,NaN\n")
    with pytest.raises(DataError,
                       match=r"d.csv: row 2: field 'preference': must be a finite number, got nan"):
        load_preference_data(csv)
    assert load_preference_data(csv, skip_bad_rows=True).pairs[0].preference == 1.0  # the empty cell: default
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["w1"], "chosen": [" w2"], "rejected": [" w3"],
                             "margin": [float("nan")]}), parquet)  # a NaN stored as a value
    with pytest.raises(DataError,
                       match=r"d.parquet: row 1: field 'margin': must be a finite number, got nan"):
        load_preference_data(parquet)
    # pandas writes the missing margin as null
    pd.DataFrame([GOOD, {**GOOD, "margin": 0.5}]).to_parquet(parquet)
    assert [p.margin for p in load_preference_data(parquet).pairs] == [0.0, 0.5]


# ---- one format per file --------------------------------------------------------------------------


@pytest.mark.parametrize("row,message", [
    ({"prompt": [msg("user", "w1")], "chosen": [msg("assistant", "w2")],
      "rejected": [msg("assistant", "w3")]},
     "field 'chosen': conversational (lists of {'role', 'content'} messages) row, but the file's first row "
     "(row 1) is standard (texts with a 'prompt'); one file holds one format"),
    ({"chosen": "w1 w2", "rejected": "w1 w3"},
     "field 'prompt': implicit-prompt (chosen/rejected texts without a 'prompt') row, but the file's "
     "first row (row 1) is standard (texts with a 'prompt'); one file holds one format"),
], ids=["conversational", "implicit prompt"])
def test_row_in_another_format_than_the_first_is_an_error(tmp_path, row, message):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer=TOK)
    assert str(err.value) == f"{path}: row 3: {message}; {SKIP_HINT}"


# ---- truncated and corrupt compressed files -------------------------------------------------------

LINES = [json.dumps({"prompt": f"w{i % 50}", "chosen": " w1", "rejected": " w2"}) + "\n" for i in range(300)]


def test_truncated_gz_names_the_last_good_row(tmp_path):
    whole = gzip.compress("".join(LINES).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    text = str(err.value)
    good = int(text.rsplit(" ", 1)[1])
    assert text == (f"{path}: truncated compressed file (it ends before the gzip end-of-stream marker); "
                    f"the last good row is row {good}")
    assert 0 < good < 300  # every whole row decompressed before the cut, none made up
    decompressed = zlib.decompressobj(wbits=31).decompress(path.read_bytes())
    assert good == decompressed.count(b"\n")


def test_corrupt_gz_names_the_last_good_row(tmp_path):
    packer = zlib.compressobj(wbits=31)
    head = packer.compress("".join(LINES[:120]).encode()) + packer.flush(zlib.Z_FULL_FLUSH)
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(head + b"\xff" * 64)  # a reserved deflate block type right after row 120
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert str(err.value) == (f"{path}: corrupt compressed file (invalid block type); "
                              "the last good row is row 120")
    # checksum broken
    path.write_bytes(gzip.compress(b"".join(x.encode() for x in LINES))[:-8] + b"\0" * 8)
    with pytest.raises(DataError,
                       match=r"bad.jsonl.gz: corrupt compressed file \(its checksum does not match"):
        load_preference_data(path)


# ---- a loss whose data kind does not match the file -----------------------------------------------


def test_unpaired_loss_on_paired_data_says_what_it_needs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(DataError) as err:
        load_data(config(path, loss="kto", skip_bad_rows=True), TOK, kind="unpaired")
    assert str(err.value) == (
        f"{path}: loss 'kto' needs unpaired rows {{'prompt', 'completion', 'label'}} (a true/false label per "
        "completion), but this file holds preference pairs (row 1 has chosen, prompt, rejected); "
        "use a paired loss (e.g. sigmoid) for pairs")


def test_paired_loss_on_unpaired_data_says_what_it_needs(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "w1", "completion": " w2", "label": True}])
    with pytest.raises(DataError) as err:
        load_data(config(path, loss="sigmoid"), TOK, kind="paired")
    assert str(err.value) == (
        f"{path}: loss 'sigmoid' needs preference pairs: 'chosen' and 'rejected' "
        "(with a 'prompt', or sharing one), but this file holds unpaired labelled rows "
        "('completion' with a 'label', as for KTO) "
        "(row 1 has completion, label, prompt); use loss: kto for unpaired data")


def test_prompt_files_hold_prompts_messages_or_pairs(tmp_path):
    """One reader for PPO, iterate and eval: prompt strings, message lists (chat template) and the
    prompts of preference rows; an empty prompt names file, row and field."""
    import json

    from helpers import tiny_tokenizer
    from preftune.data.formats import read_prompts

    tok = tiny_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w1 w2"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "w3"}]}) + "\n")
    assert [p.text for p in read_prompts(path, tok)] == ["w1 w2", "<user> w3 <assistant> "]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "w4", "chosen": " w5", "rejected": " w6"}) + "\n")
    assert read_prompts([path, pairs], tok)[-1].text == "w4"
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"prompt": "w1"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(DataError, match="e.jsonl: row 2: field 'prompt': expected a non-empty string"):
        read_prompts(empty, tok)
    assert [p.text for p in read_prompts(empty, tok, skip_bad_rows=True)] == ["w1"]
