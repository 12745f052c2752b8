"""The data path at real sizes: rows streamed, tokenized in chunks exactly as in one list, token ids
in a memory-mapped Arrow store (a few bytes per token, not Python objects), cached on disk."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pyarrow as pa
import pytest

from helpers import tiny_tokenizer
from preftune.data import pipeline, store
from preftune.data.formats import load_preference_data
from preftune.data.pipeline import tokenize_files
from preftune.data.tokenize import Budgets, PairTokenizer, TokenizedPair, fingerprint_of

TOK = tiny_tokenizer()


def words(rng_seed: int, n: int) -> str:
    return " ".join(f"w{(rng_seed * 31 + k * 7) % 58}" for k in range(n))


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows and record batches of 5 pairs: every boundary is crossed."""
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 3)
    monkeypatch.setattr(store, "CHUNK", 5)


PAIRS = [{"prompt": words(i, 1 + i % 4), "chosen": " " + words(i + 1, 1 + i % 5),
          "rejected": " " + words(i + 2, 2)} for i in range(17)]
PAIRS[4]["rejected"] = PAIRS[4]["chosen"]  # dropped: chosen == rejected
PAIRS[9]["chosen"] = " "  # an empty completion: EOS alone


def test_chunked_store_equals_tokenizing_one_list(tmp_path, small_chunks):
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    budgets = Budgets(8, 4)
    whole = PairTokenizer(TOK, budgets).tokenize(load_preference_data(path).pairs)
    got = tokenize_files([path], TOK, budgets, cache_dir=str(tmp_path / "cache"))
    assert list(got.data.pairs) == whole.pairs  # ids, labels, origins: every field
    assert [got.data.pairs[i] for i in (0, 5, -1)] == [whole.pairs[0], whole.pairs[5], whole.pairs[-1]]
    assert got.data.pairs[3:7] == whole.pairs[3:7]
    counters = ("dropped_equal", "dropped_identical", "truncated", "empty_completions", "first_dropped")
    assert [getattr(got.data, k) for k in counters] == [getattr(whole, k) for k in counters]
    assert got.data.dropped_equal == 1 and got.data.empty_completions == 1 and got.data.truncated > 0
    assert got.data.fingerprint() == fingerprint_of(whole.pairs)  # the run identity of today's data


def test_unpaired_examples_borrow_across_chunks_as_in_one_list(tmp_path, small_chunks):
    rows = [{"prompt": words(i, 2), "completion": " " + words(i + 3, 1 + i % 3), "label": i % 2 == 0}
            for i in range(8)]
    path = write_rows(tmp_path / "kto.jsonl", rows)
    examples = load_preference_data(path, kind="unpaired").unpaired
    whole = PairTokenizer(TOK, Budgets(16, 8)).tokenize_unpaired(examples)
    got = tokenize_files([path], TOK, Budgets(16, 8), kind="unpaired", cache_dir=str(tmp_path / "cache"))
    # example i's mismatched completion is example i+1's, cyclically
    assert list(got.data.pairs) == whole.pairs


def test_sft_masks_survive_the_store(tmp_path, small_chunks):
    rows = [{"messages": [{"role": "user", "content": words(i, 2)},
                          {"role": "assistant", "content": words(i, 3)},
                          {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}]}
            for i in range(7)]
    path = write_rows(tmp_path / "sft.jsonl", rows)
    examples = load_preference_data(path, kind="sft", tokenizer=TOK).sft
    whole = PairTokenizer(TOK, Budgets(64, 32)).tokenize_sft(examples)
    got = tokenize_files([path], TOK, Budgets(64, 32), kind="sft", cache_dir=str(tmp_path / "cache"))
    assert list(got.data.pairs) == whole.pairs and got.data.pairs[0].chosen_mask is not None


def test_second_load_reads_the_cache_and_a_changed_file_does_not(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    write_rows(path, [*PAIRS, {"prompt": "w1", "chosen": "w2"}])
    cache = str(tmp_path / "cache")
    first = tokenize_files([str(path)], TOK, Budgets(8, 4), skip_bad_rows=True, cache_dir=cache)
    second = tokenize_files([str(path)], TOK, Budgets(8, 4), skip_bad_rows=True, cache_dir=cache)
    assert not first.cached and second.cached
    assert list(second.data.pairs) == list(first.data.pairs)
    assert second.skipped == first.skipped == [f"{path}: row 18: field 'rejected': missing"]
    assert second.data.drops() == first.data.drops() and second.data.fingerprint() == first.data.fingerprint()
    other_budget = tokenize_files([str(path)], TOK, Budgets(9, 4), skip_bad_rows=True, cache_dir=cache)
    assert not other_budget.cached
    write_rows(path, PAIRS[:5])
    changed = tokenize_files([str(path)], TOK, Budgets(8, 4), cache_dir=cache)
    assert not changed.cached and len(changed.data.pairs) == 4


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, caplog):
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    cache = tmp_path / "cache"
    first = tokenize_files([path], TOK, Budgets(8, 4), cache_dir=str(cache))
    (entry,) = [d for d in cache.iterdir() if not d.name.startswith(".")]
    arrow = entry / pipeline.STORE_FILE
    del first
    gc.collect()
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    arrow.write_bytes(bytes(data))
    caplog.set_level("INFO", logger="preftune")
    again = tokenize_files([path], TOK, Budgets(8, 4), cache_dir=str(cache))
    assert not again.cached and "corrupt: its store does not match its checksum" in caplog.text
    assert tokenize_files([path], TOK, Budgets(8, 4), cache_dir=str(cache)).cached
    assert [d.name for d in cache.iterdir()] == [entry.name]  # nothing half-written left beside it


def test_a_bad_row_writes_nothing(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", [*PAIRS, {"prompt": "w1", "chosen": 3, "rejected": "w2"}])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="row 18: field 'chosen'"):
        tokenize_files([path], TOK, Budgets(8, 4), cache_dir=str(cache))
    assert list(cache.iterdir()) == []


def test_store_holds_a_few_bytes_per_token_not_python_objects(tmp_path):
    """20,000 pairs of long rows: what the loaded data keeps in memory (Python objects, numpy and
    Arrow allocations) stays under 2 bytes per token (it is memory-mapped: ~0.01), and the file under
    4 (uint16 ids + offsets). Token ids kept as Python tuples cost 8 (small ints) to 36 bytes per
    token, as lists more: a regression to Python objects fails this."""
    n = 20_000
    warm = write_rows(tmp_path / "warm.jsonl", PAIRS)  # imports and the tokenizer's caches, before measuring
    tokenize_files([warm], TOK, Budgets(1024, 512), cache_dir=str(tmp_path / "c"))
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": words(i, 40), "chosen": " " + words(i + 1, 120),
                                "rejected": " " + words(i + 2, 110)}) + "\n")
    gc.collect()
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    got = tokenize_files([str(tmp_path / "big.jsonl")], TOK, Budgets(1024, 512),
                         cache_dir=str(tmp_path / "c"))
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held += pa.total_allocated_bytes() - arrow_before
    tokens = int(got.data.pairs.token_counts().sum())
    assert len(got.data.pairs) == n and tokens > 5_000_000
    assert held / tokens < 2, f"{held / tokens:.2f} bytes held per token"
    assert got.data.pairs.nbytes / tokens < 4
    assert got.data.pairs[n - 1] == TokenizedPair(*[tuple(x) for x in (
        TOK(words(n - 1, 40))["input_ids"],
        TOK(" " + words(n, 120), add_special_tokens=False)["input_ids"] + [2],
        TOK(" " + words(n + 1, 110), add_special_tokens=False)["input_ids"] + [2])],
        origin=f"{tmp_path / 'big.jsonl'}: row {n}")


def test_a_killed_build_is_cleaned_up_later(tmp_path):
    import os
    import time

    cache = tmp_path / "cache"
    stale, live = cache / ".abc.dead", cache / ".abc.live"
    for work in (stale, live):
        work.mkdir(parents=True)
        (work / ".pairs.arrow.1.tmp").write_bytes(b"partial")
    old = time.time() - 7 * 3600
    for path in (stale, stale / ".pairs.arrow.1.tmp"):
        os.utime(path, (old, old))
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    tokenize_files([path], TOK, Budgets(8, 4), cache_dir=str(cache))
    assert not stale.exists() and live.exists()  # a build written to within the last 6 hours may be running


def test_data_cache_dir_is_where_load_data_caches(tmp_path):
    from types import SimpleNamespace

    from preftune.engine.setup import load_data

    path = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    config = SimpleNamespace(train_files=[path], eval_files=[], skip_bad_rows=False, max_length=8,
                             max_prompt_length=4, max_completion_length=None,
                             data_cache_dir=str(tmp_path / "mine"))
    load_data(config, TOK)
    assert len([p for p in (tmp_path / "mine").iterdir() if not p.name.startswith(".")]) == 1  # one entry
