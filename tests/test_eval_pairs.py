"""``preftune eval --pairs`` reads its pairs as training does: token ids in a memory-mapped, cached
store for the implicit reward, texts streamed a chunk at a time for a reward model, prompts streamed
until ``num_prompts`` are found. Nothing holds the file's texts."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import write_pairs
from preftune.data.io import DataError
from preftune.data.store import PairStore
from preftune.data.tokenize import Budgets
from preftune.eval import scoring
from preftune.eval.config import EvalConfig
from preftune.eval.inputs import load_prompts, tokenize_eval_pairs
from preftune.model.hub import EMBEDDED_MODEL
from preftune.model.load import load_tokenizer

needs_embedded = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                    reason="embedded model missing")


def config(tmp_path, pairs, **overrides) -> EvalConfig:
    return EvalConfig(models=["embedded"], pairs=str(pairs), output_dir=str(tmp_path / "out"), **overrides)


@needs_embedded
def test_prompts_of_pairs_are_read_until_num_prompts(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": " a", "rejected": " b"} for p in ("One.", "One.", "Two.")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    tokenizer = load_tokenizer("embedded")
    prompts, source = load_prompts(config(tmp_path, path, num_prompts=2), tokenizer)
    # row 4 never read
    assert [p.text for p in prompts] == ["One.", "Two."] and source == f"2 prompts from the prompts of {path}"
    with pytest.raises(DataError, match="row 4"):  # all prompts: the broken row is reached
        load_prompts(config(tmp_path, path), tokenizer)


@needs_embedded
def test_eval_pairs_are_a_cached_memory_mapped_store(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=12)
    tokenizer, budgets = load_tokenizer("embedded"), Budgets(256, 128)
    first = tokenize_eval_pairs(config(tmp_path, pairs), tokenizer, budgets)
    assert isinstance(first.data.pairs, PairStore) and len(first.data.pairs) == 12 and not first.cached
    again = tokenize_eval_pairs(config(tmp_path, pairs), tokenizer, budgets)
    assert again.cached and list(again.data.pairs) == list(first.data.pairs)


@needs_embedded
def test_reward_model_accuracy_does_not_depend_on_the_chunk(tmp_path, monkeypatch):
    from preftune.rewards.reward_model import load_reward_model

    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    load_reward_model("embedded", pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=10)
    whole = scoring.reward_model_accuracy(str(tmp_path / "rm"), config(tmp_path, pairs), torch.device("cpu"))
    monkeypatch.setattr(scoring, "REWARD_CHUNK", 3)  # 10 pairs in chunks of 3, 3, 3, 1
    chunked = scoring.reward_model_accuracy(str(tmp_path / "rm"), config(tmp_path, pairs),
                                            torch.device("cpu"))
    assert chunked.num_pairs == whole.num_pairs == 10
    # each pair is scored beside other pairs (other padding, other kernels' blocking): each reward is a
    # 64-term fp32 dot product of the last hidden state, equal to a few eps of its terms (rewards ~0.1-1)
    assert chunked.accuracy == whole.accuracy  # margins are ~1e-2, far from a sign flip by rounding
    assert (chunked.chosen, chunked.rejected) == (pytest.approx(whole.chosen, rel=1e-5, abs=1e-6),
                                                  pytest.approx(whole.rejected, rel=1e-5, abs=1e-6))
