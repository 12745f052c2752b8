"""Tokenization: masks, EOS, budgets, identical-after-truncation, chat templates, pad-less tokenizers."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_tokenizer
from preftune.data.batching import collate
from preftune.data.formats import PreferencePair, UnpairedExample
from preftune.data.tokenize import Budgets, PairTokenizer

BOS, EOS = 1, 2


def ids(text: str) -> list[int]:
    """Ids of words ``w<k>`` in the tiny tokenizer (``w<k>`` has id k + 3)."""
    return [int(w[1:]) + 3 for w in text.split()]


def tok_pairs(pairs, **budgets):
    return PairTokenizer(tiny_tokenizer(), Budgets(**budgets)).tokenize(pairs)


def test_prompt_once_completions_with_eos():
    out = tok_pairs([PreferencePair("w1 w2", " w3 w4", " w5")])
    (pair,) = out.pairs
    assert pair.prompt_ids == (BOS, *ids("w1 w2"))
    assert pair.chosen_ids == (*ids("w3 w4"), EOS)
    assert pair.rejected_ids == (*ids("w5"), EOS)


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_scored_tokens_are_exactly_the_completion_tokens(layout):
    data = tok_pairs([PreferencePair("w1 w2 w3", " w4 w5", " w6"),
                      PreferencePair("w7", " w8", " w9 w10 w11")])
    batch = collate(data.pairs, layout=layout, pack_length=64)
    flat = batch.input_ids.reshape(-1)
    for seq, (pair, side) in enumerate([(p, "c") for p in data.pairs] + [(p, "r") for p in data.pairs]):
        completion = pair.chosen_ids if side == "c" else pair.rejected_ids
        sel = batch.score_sequence == seq
        # targets are the completion (with EOS) in order, never prompt or padding tokens
        assert batch.score_target[sel].tolist() == list(completion)
        # the position predicting the first completion token holds the last prompt token
        assert flat[batch.score_index[sel][0]].item() == pair.prompt_ids[-1]
        # every later predicting position holds the previous completion token
        assert flat[batch.score_index[sel][1:]].tolist() == list(completion[:-1])
        assert flat[batch.last_index[seq]].item() == EOS
    prompts_counted = 1 if layout == "prefix_shared" else 2  # the shared layout computes a prompt once
    assert batch.num_real_tokens == sum(
        prompts_counted * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in data.pairs
    )


def test_padded_mask_covers_real_tokens_only():
    data = tok_pairs([PreferencePair("w1", " w2 w3 w4", " w5"), PreferencePair("w1 w2 w3", " w4", " w5")])
    batch = collate(data.pairs, layout="padded")
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in data.pairs] + [
        len(p.prompt_ids) + len(p.rejected_ids) for p in data.pairs]
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.attention_mask.shape == batch.input_ids.shape


def test_prefix_shared_mask_hides_chosen_from_rejected():
    data = tok_pairs([PreferencePair("w1 w2", " w3 w4", " w5 w6")])
    batch = collate(data.pairs, layout="prefix_shared")
    mask = batch.attention_mask[0, 0]
    n_p, n_c = 3, 3  # BOS w1 w2 | w3 w4 EOS | w5 w6 EOS
    rejected_rows = mask[n_p + n_c :]
    assert rejected_rows[:, :n_p].all()  # rejected sees the prompt
    assert not rejected_rows[:, n_p : n_p + n_c].any()  # but not the chosen tokens
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]


def test_truncation_budgets():
    pair = PreferencePair("w1 w2 w3 w4 w5 w6", " w7 w8 w9 w10", " w11 w12 w13 w14 w15")
    (p,) = tok_pairs([pair], max_length=8, max_prompt_length=4, max_completion_length=3).pairs
    assert p.prompt_ids == (BOS, *ids("w4 w5 w6"))  # the prompt loses its start, BOS kept
    assert p.chosen_ids == tuple(ids("w7 w8 w9"))  # a completion loses its end (and EOS)
    (p,) = tok_pairs([pair], max_length=6, max_prompt_length=4).pairs
    assert len(p.prompt_ids) + len(p.chosen_ids) == 6 and p.chosen_ids == tuple(ids("w7 w8"))
    (p,) = tok_pairs([pair], max_length=4, max_prompt_length=None).pairs
    assert p.prompt_ids == (BOS, *ids("w5 w6")) and p.chosen_ids == tuple(ids("w7"))


def test_identical_after_truncation_is_dropped_and_counted():
    pairs = [PreferencePair("w1", " w2 w3 w4", " w2 w3 w5"), PreferencePair("w1", " w2", " w3")]
    out = tok_pairs(pairs, max_completion_length=2)
    assert out.dropped_identical == 1 and len(out.pairs) == 1
    assert out.pairs[0].chosen_ids == (ids("w2")[0], EOS)


def test_budget_validation():
    with pytest.raises(ValueError, match="max_prompt_length .* must be < max_length"):
        Budgets(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_completion_length must be >= 1"):
        Budgets(max_completion_length=0)


def test_tokenizer_without_pad_or_bos():
    tok = tiny_tokenizer()
    assert tok.pad_token_id is None
    out = PairTokenizer(tok, Budgets()).tokenize([PreferencePair("w1", " w2", " w3")])
    batch = collate(out.pairs, layout="padded", pad_id=0)
    assert batch.input_ids.shape[0] == 2
    # no BOS and an empty prompt: the first token has no context, a clear error
    tok._tokenizer.post_processor = None
    with pytest.raises(ValueError, match="field 'prompt': empty after tokenization"):
        PairTokenizer(tok, Budgets()).tokenize([PreferencePair("", " w2", " w3", origin="f.jsonl: row 1")])


def test_unpaired_pairs_with_next_completion():
    examples = [UnpairedExample("w1", " w2", True), UnpairedExample("w3", " w4", False)]
    out = PairTokenizer(tiny_tokenizer(), Budgets()).tokenize_unpaired(examples)
    first, second = out.pairs
    assert first.chosen_ids == (*ids("w2"), EOS) and first.rejected_ids == (*ids("w4"), EOS)
    assert second.rejected_ids == (*ids("w2"), EOS)
    assert [p.preference for p in out.pairs] == [1.0, 0.0]


def test_chat_template_rows_tokenize(tmp_path):
    from preftune.data.formats import load_preference_data
    from test_data import write_jsonl

    rows = [{"prompt": [{"role": "user", "content": "w1"}],
             "chosen": [{"role": "assistant", "content": "w2"}],
             "rejected": [{"role": "assistant", "content": "w3"}]}]
    tok = tiny_tokenizer()
    data = load_preference_data(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer=tok)
    (p,) = PairTokenizer(tok, Budgets()).tokenize(data.pairs).pairs
    user, assistant = tok.convert_tokens_to_ids(["<user>", "<assistant>"])
    assert p.prompt_ids == (BOS, user, *ids("w1"), assistant)
    assert p.chosen_ids == (*ids("w2"), EOS)
    assert torch.tensor(p.rejected_ids).tolist() == [*ids("w3"), EOS]
