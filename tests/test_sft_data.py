"""SFT data: row formats -> SFTExample segments -> token ids with a loss mask, checked token by token."""

from __future__ import annotations

import hashlib
import json

import pytest

from helpers import tiny_tokenizer
from preftune.data.formats import SFTExample, load_preference_data, parse_rows
from preftune.data.io import DataError, RawRow
from preftune.data.tokenize import Budgets, PairTokenizer, TokenizedData, TokenizedPair

BOS, EOS = 1, 2
TOK = tiny_tokenizer()
USER, ASSISTANT = TOK.convert_tokens_to_ids(["<user>", "<assistant>"])


def ids(text: str) -> list[int]:
    """Ids of words ``w<k>`` in the tiny tokenizer (``w<k>`` has id k + 3)."""
    return [int(w[1:]) + 3 for w in text.split()]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load_sft(tmp_path, rows, **kwargs):
    return load_preference_data(write_jsonl(tmp_path / "sft.jsonl", rows), kind="sft", tokenizer=TOK,
                                **kwargs)


def tokenize_sft(examples, tokenizer=None, **budgets):
    return PairTokenizer(tokenizer or tiny_tokenizer(), Budgets(**budgets)).tokenize_sft(examples)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATION = [msg("user", "w1"), msg("assistant", "w2 w3"), msg("user", "w4"), msg("assistant", "w5")]


def test_prompt_completion_strings(tmp_path):
    data = load_sft(tmp_path, [{"prompt": "w1 w2", "completion": " w3 w4"}])
    (ex,) = data.sft
    assert ex == SFTExample("w1 w2", ((" w3 w4", True),), f"{tmp_path / 'sft.jsonl'}: row 1")
    assert ex.completion == " w3 w4"
    assert not data.pairs and not data.unpaired
    (p,) = tokenize_sft(data.sft).pairs
    assert p.prompt_ids == (BOS, *ids("w1 w2")) == tuple(TOK("w1 w2")["input_ids"])
    assert p.chosen_ids == (*ids("w3 w4"), EOS)
    assert p.chosen_ids[:-1] == tuple(TOK(" w3 w4", add_special_tokens=False)["input_ids"])
    assert p.rejected_ids == () and p.preference == 1.0 and p.chosen_mask is None
    assert p.origin.endswith("sft.jsonl: row 1")


def test_conversational_prompt_completion(tmp_path):
    rows = [{"prompt": [msg("user", "w1")], "completion": [msg("assistant", "w2")]},
            {"prompt": "w3", "completion": [msg("assistant", "w4")]}]
    first, second = load_sft(tmp_path, rows).sft
    assert (first.prompt, first.segments) == ("<user> w1 <assistant> ", (("w2 ", True),))
    assert (second.prompt, second.segments) == ("<user> w3 <assistant> ", (("w4 ", True),))
    p, _ = tokenize_sft([first, second]).pairs
    assert p.prompt_ids == (BOS, USER, *ids("w1"), ASSISTANT)
    assert p.chosen_ids == (*ids("w2"), EOS) and p.chosen_mask is None


def test_messages_train_on_assistant_turns_only(tmp_path):
    (ex,) = load_sft(tmp_path, [{"messages": CONVERSATION}]).sft
    assert ex.prompt == "<user> w1 <assistant> "
    assert ex.segments == (("w2 w3 ", True), ("<user> w4 <assistant> ", False), ("w5 ", True))
    (p,) = tokenize_sft([ex]).pairs
    assert p.prompt_ids == (BOS, USER, *ids("w1"), ASSISTANT)
    assert p.chosen_ids == (*ids("w2 w3"), USER, *ids("w4"), ASSISTANT, *ids("w5"), EOS)
    #                      w2    w3    <user> w4     <assistant> w5    EOS
    assert p.chosen_mask == (True, True, False, False, False, True, True)
    # prompt + completion are exactly the tokenization of the whole rendered conversation
    whole = TOK.apply_chat_template(CONVERSATION, tokenize=False)
    assert p.prompt_ids + p.chosen_ids[:-1] == tuple(TOK(whole)["input_ids"])


def test_messages_system_prefix_and_trailing_user_turn(tmp_path):
    rows = [{"messages": [msg("system", "w9"), msg("user", "w1"), msg("assistant", "w2"), msg("user", "w3")]}]
    (ex,) = load_sft(tmp_path, rows).sft
    assert ex.prompt == "<system> w9 <user> w1 <assistant> "
    assert ex.segments == (("w2 ", True), ("<user> w3 ", False))
    (p,) = tokenize_sft([ex]).pairs
    assert p.chosen_ids == (*ids("w2"), USER, *ids("w3"), EOS)
    assert p.chosen_mask == (True, False, False, False)  # EOS follows an untrained segment: untrained


def test_preference_rows_give_the_chosen_side(tmp_path):
    rows = [
        {"prompt": "w1", "chosen": " w2 w3", "rejected": " w4"},
        {"chosen": "\n\nHuman: w1\n\nAssistant: w2 w3", "rejected": "\n\nHuman: w1\n\nAssistant: w4"},
        {"prompt": [msg("user", "w1")], "chosen": [msg("assistant", "w2")],
         "rejected": [msg("assistant", "w3")]},
        {"prompt": "w1", "chosen": " w2", "rejected": " w4", "preference": 0.8},
    ]
    # one format a file
    standard, hh, chat, with_preference = (load_sft(tmp_path, [row]).sft[0] for row in rows)
    assert (standard.prompt, standard.segments) == ("w1", ((" w2 w3", True),))
    assert (hh.prompt, hh.segments) == ("\n\nHuman: w1\n\nAssistant:", ((" w2 w3", True),))
    assert (chat.prompt, chat.segments) == ("<user> w1 <assistant> ", (("w2 ", True),))
    assert with_preference.segments == ((" w2", True),)
    p = tokenize_sft([standard]).pairs[0]
    assert p.chosen_ids == (*ids("w2 w3"), EOS) and p.chosen_mask is None
    # an implicit prompt that leaves the chosen side empty: trained on EOS alone, as for pairs
    (empty,) = load_sft(tmp_path, [{"chosen": "w1 w2", "rejected": "w1 w2 w3"}]).sft
    assert empty.segments == (("", True),)
    (p,) = tokenize_sft([empty]).pairs
    assert p.chosen_ids == (EOS,) and p.chosen_mask is None


BAD_ROWS = [
    ({"messages": [msg("user", "w1"), msg("user", "w2")]}, "field 'messages': no assistant message"),
    ({"messages": [msg("user", "w1"), msg("assistant", " "), msg("user", "w2")]},
     "field 'messages': every assistant message is empty"),
    ({"messages": "w1 w2"}, "field 'messages': expected a non-empty list of {'role', 'content'} messages"),
    ({"messages": []}, "field 'messages': expected a non-empty list"),
    ({"prompt": "w1"},
     "field 'completion': missing (an SFT row needs 'messages', or 'prompt' + 'completion'"),
    ({"completion": " w2"}, "field 'prompt': missing"),
    ({"prompt": "w1", "completion": 3}, "field 'completion': expected a string, got int"),
    ({"prompt": 5, "completion": " w2"}, "field 'prompt': expected a string, got int"),
    ({"prompt": {"a": 1}, "completion": [msg("assistant", "w2")]},
     "field 'prompt': expected a string or a list"),
    ({"prompt": "w1", "chosen": 3, "rejected": " w2"}, "field 'chosen': expected a string, got int"),
    ({"prompt": "w1", "chosen": " w2"}, "field 'rejected': missing"),
    ({"text": "w1"},
     "an SFT row needs 'messages', or 'prompt' + 'completion', or 'prompt'/'chosen'/'rejected'"),
    ("{not json", "unparsable JSON line"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_sft_row_names_file_row_and_field(tmp_path, row, message):
    conversational = isinstance(row, dict) and ("messages" in row
                                                or any(isinstance(v, list) for v in row.values()))
    # same format
    good = {"messages": CONVERSATION} if conversational else {"prompt": "w1", "completion": " w2"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        load_preference_data(path, kind="sft", tokenizer=TOK)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: row 2") and message in text


def test_chat_template_errors_are_row_errors(tmp_path):
    rows = [{"messages": CONVERSATION}]
    with pytest.raises(DataError,
                       match=r"row 1: field 'messages': conversational row, but .* no chat template"):
        load_preference_data(write_jsonl(tmp_path / "m.jsonl", rows), kind="sft", tokenizer=None)
    counting = tiny_tokenizer()  # each rendering starts with the message count: never a prefix of the next
    counting.chat_template = "{{ messages | length }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(DataError, match=r"row 1: field 'messages': chat template does not render the "
                                        r"conversation incrementally"):
        load_preference_data(tmp_path / "m.jsonl", kind="sft", tokenizer=counting)
    strict = tiny_tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError,
                       match=r"row 1: field 'messages': chat template failed: roles must alternate"):
        load_preference_data(tmp_path / "m.jsonl", kind="sft", tokenizer=strict)


def test_skip_bad_rows_counts(tmp_path):
    rows = [{"prompt": "w1", "completion": [msg("assistant", "w2")]}, {"prompt": "w1"}, "{oops",
            {"messages": [msg("user", "w1")]}, {"messages": CONVERSATION}]
    data = load_sft(tmp_path, rows, skip_bad_rows=True)
    assert len(data.sft) == 2
    assert len(data.skipped) == 3
    assert ["row 2" in data.skipped[0], "row 3" in data.skipped[1], "row 4" in data.skipped[2]] == [True] * 3
    with pytest.raises(DataError, match="no usable rows"):
        load_sft(tmp_path, rows[1:4], skip_bad_rows=True)


def test_kind_is_checked():
    with pytest.raises(ValueError, match="kind must be 'paired', 'unpaired' or 'sft'"):
        parse_rows([RawRow("f", 1, {"prompt": "w1", "completion": " w2"})], kind="chat")


def test_straddling_token_goes_with_the_segment_it_starts_in():
    # "w12" is one token; it starts in the first segment, whose flag it takes
    starts_untrained = SFTExample("w1", ((" w1", False), ("2 w3", True)))
    starts_trained = SFTExample("w1", ((" w1", True), ("2 w3", False)))
    a, b = tokenize_sft([starts_untrained, starts_trained]).pairs
    assert a.chosen_ids == b.chosen_ids == (*ids("w12 w3"), EOS)
    assert a.chosen_mask == (False, True, True)
    assert b.chosen_mask == (True, False, False)


def test_completion_that_does_not_continue_the_prompt_is_tokenized_alone():
    # "w1" + "2 w3" tokenizes jointly as "w12 w3": the prompt's ids are no prefix, so the completion
    # stands alone
    (p,) = tokenize_sft([SFTExample("w1", (("2 ", False), ("w3", True)))]).pairs
    assert p.prompt_ids == (BOS, *ids("w1"))
    assert p.chosen_ids == (TOK.unk_token_id, *ids("w3"), EOS)
    assert p.chosen_mask == (False, True, True)


class NoOffsets:
    """A tokenizer without character offsets (like a slow one): only plain ids."""

    is_fast = False

    def __init__(self, tok):
        self.tok, self.eos_token_id, self.bos_token_id = tok, tok.eos_token_id, tok.bos_token_id

    def __call__(self, texts, add_special_tokens, **kwargs):
        return self.tok(texts, add_special_tokens=add_special_tokens, **kwargs)


def test_tokenizer_without_offsets_goes_segment_by_segment(tmp_path):
    (ex,) = load_sft(tmp_path, [{"messages": CONVERSATION}]).sft
    fast, slow = tokenize_sft([ex]).pairs[0], tokenize_sft([ex], tokenizer=NoOffsets(TOK)).pairs[0]
    assert slow == fast
    # segment by segment: the straddling "w12" is split into "w1" + "2" (unknown)
    (p,) = tokenize_sft([SFTExample("w1", ((" w1", False), ("2 w3", True)))], tokenizer=NoOffsets(TOK)).pairs
    assert p.chosen_ids == (*ids("w1"), TOK.unk_token_id, *ids("w3"), EOS)
    assert p.chosen_mask == (False, True, True, True)


def test_truncation_cuts_the_mask_and_drops_untrained_examples():
    late = SFTExample("w1", ((" w2 w3", False), (" w4 w5", True)), "f: row 1")
    early = SFTExample("w1", ((" w6", True), (" w7 w8", False)), "f: row 2")
    out = tokenize_sft([late, early], max_completion_length=2)
    assert out.dropped_untrained == 1 and out.truncated == 2
    (p,) = out.pairs
    assert p.origin == "f: row 2"
    assert p.chosen_ids == tuple(ids("w6 w7")) and p.chosen_mask == (True, False)
    out = tokenize_sft([late], max_completion_length=3)
    assert out.dropped_untrained == 0 and out.truncated == 1
    assert out.pairs[0].chosen_ids == tuple(ids("w2 w3 w4"))
    assert out.pairs[0].chosen_mask == (False, False, True)
    # max_length: the prompt keeps its end and BOS, the completion its start
    long_prompt = SFTExample("w1 w2 w3 w4 w5", ((" w6 w7", True), (" w8", False)))
    (p,) = tokenize_sft([long_prompt], max_length=6, max_prompt_length=3).pairs
    assert p.prompt_ids == (BOS, *ids("w4 w5")) and p.chosen_ids == tuple(ids("w6 w7 w8"))
    assert p.chosen_mask == (True, True, False)
    untouched = tokenize_sft([long_prompt])
    assert untouched.truncated == 0 and untouched.pairs[0].chosen_mask == (True, True, False, False)


def test_fingerprint_includes_the_mask():
    def data(mask):
        return TokenizedData([TokenizedPair((BOS, 3), (4, 5, EOS), (), chosen_mask=mask)])

    prints = {data(m).fingerprint() for m in (None, (True, False, True), (False, True, True))}
    assert len(prints) == 3
    # without a mask the fingerprint is the one it always was (existing reference caches stay valid)
    p = data(None).pairs[0]
    old = hashlib.sha256(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids, p.preference, p.margin)).encode())
    assert data(None).fingerprint() == old.hexdigest()
