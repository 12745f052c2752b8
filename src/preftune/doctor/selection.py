"""``preftune select``: which unlabelled pairs to send to annotators next (uncertainty sampling).

Each candidate (prompt x, replies y_1, y_2) gets the model's margin m = s(x, y_1) - s(x, y_2)
(:mod:`preftune.doctor.scoring`: implicit reward of a DPO policy, or a reward model), hence its
Bradley-Terry probability p = sigmoid(m) that y_1 is better and the uncertainty

    u = H(p) = -p log2 p - (1 - p) log2 (1 - p)    (1 bit at m = 0, -> 0 as |m| grows),

the expected information of the label under the model. Greedy selection with a diversity
constraint: candidates in order of decreasing u; one is picked unless its prompt's estimated
Jaccard similarity (MinHash of word 3-grams, :mod:`preftune.doctor.text`) with an already picked
prompt is >= ``max_similarity``. If that leaves fewer than ``budget``, the most uncertain of the
skipped candidates fill the rest (marked ``"diverse": false``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.formats import LoadedData, iter_rows_and_examples
from preftune.data.io import read_rows
from preftune.data.tokenize import Budgets
from preftune.doctor.scan import SHINGLE
from preftune.doctor.text import MinHasher, ngrams

LABEL_KEYS = ("preference", "margin", "annotator", "label")


def uncertainty(margins: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of p = sigmoid(m); NaN margins give NaN."""
    p = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(margins, dtype=float)))
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def select_pairs(
    prompts: Sequence[str], margins: Sequence[float], budget: int, *, max_similarity: float = 0.5
) -> list[tuple[int, bool]]:
    """(candidate index, picked under the diversity constraint) of up to ``budget`` candidates, most
    uncertain first (module docstring); candidates with a NaN margin are never picked."""
    minhash = MinHasher()
    return select_by_signature(lambda k: minhash.signature(ngrams(prompts[k], SHINGLE)), margins, budget,
                               max_similarity=max_similarity)


def select_by_signature(
    signature: Callable[[int], np.ndarray],
    margins: Sequence[float],
    budget: int,
    *,
    max_similarity: float = 0.5,
) -> list[tuple[int, bool]]:
    """:func:`select_pairs` with each candidate's prompt given by its ``[K]`` MinHash signature."""
    u = uncertainty(np.asarray(margins, dtype=float))
    order = [int(k) for k in np.argsort(-np.nan_to_num(u, nan=-1.0), kind="stable") if not np.isnan(u[k])]
    picked: list[tuple[int, bool]] = []
    sigs: list[np.ndarray] = []
    skipped: list[int] = []
    for k in order:
        if len(picked) >= budget:
            break
        sig = signature(k)
        if sigs and (np.stack(sigs) == sig[None, :]).mean(axis=1).max() >= max_similarity:
            skipped.append(k)
            continue
        picked.append((k, True))
        sigs.append(sig)
    picked += [(k, False) for k in skipped[: budget - len(picked)]]
    return picked


def select_file(
    pool: str | Path,
    out: str | Path,
    *,
    budget: int,
    model: str,
    reference: str | None = None,
    beta: float = 0.1,
    budgets: Budgets | None = None,
    max_similarity: float = 0.5,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Score the pool with ``model``, pick ``budget`` pairs, write them (JSONL) for annotation: each
    row as in the pool, without label fields, plus ``score`` {margin, p_first, uncertainty, diverse}
    and ``pool_row``; ``chosen``/``rejected`` are the two candidates in pool order, not a label."""
    from preftune.doctor.scoring import PairScorer

    out = Path(out)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"--out {out}: picked pairs are written as .jsonl or .jsonl.gz")
    scorer = PairScorer.load(model, reference=reference, beta=beta, budgets=budgets, batch_size=batch_size)
    rows, margin, sigs, skips = _score_pool(pool, scorer)
    picks = select_by_signature(sigs.__getitem__, margin, budget, max_similarity=max_similarity)
    u = uncertainty(margin)
    _write_picks(pool, out, picks, rows, margin, u)
    return {
        "out": str(out),
        "candidates": len(rows),
        "picked": len(picks),
        "bad_rows_skipped": len(skips.skipped),
        "bad_rows": skips.skipped,  # each naming file, row and field
        "scorer": scorer.description,
        "mean_uncertainty": float(np.mean([u[k] for k, _ in picks])) if picks else 0.0,
        "pool_mean_uncertainty": float(np.nanmean(u)),
    }


def _score_pool(pool: str | Path, scorer: Any) -> tuple[list[int], np.ndarray, list[np.ndarray], LoadedData]:
    """Pass 1, streamed: the pool row of each usable candidate, its ``[N]`` margins, its prompts'
    MinHash signatures, and the skipped rows; no candidate's text is kept."""
    skips, minhash = LoadedData(), MinHasher()
    rows, margins, sigs, chunk = [], [], [], []

    def flush() -> None:
        margins.append(scorer.margins(chunk))
        sigs.extend(minhash.signature(ngrams(p.prompt, SHINGLE)) for p in chunk)
        chunk.clear()

    parsed = iter_rows_and_examples(
        read_rows(pool), kind="paired", tokenizer=scorer.tokenizer, skip_bad_rows=True, skips=skips
    )
    for raw, pair in parsed:
        rows.append(raw.row)
        chunk.append(pair)
        if len(chunk) == 256:
            flush()
    if chunk:
        flush()
    if not rows:
        raise ValueError(f"{pool}: no usable candidate pairs")
    return rows, np.concatenate(margins), sigs, skips


def _write_picks(
    pool: str | Path,
    out: Path,
    picks: list[tuple[int, bool]],
    rows: list[int],
    margin: np.ndarray,
    u: np.ndarray,
) -> None:
    """Pass 2: the picked rows as they are in the pool, without label fields, with their ``score``
    and ``pool_row``, in pick order."""
    wanted = {rows[k]: k for k, _ in picks}
    fields = {raw.row: raw.fields for raw in read_rows(pool) if raw.row in wanted}
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wt", encoding="utf-8") as f:
        for k, diverse in picks:
            row = {key: v for key, v in fields[rows[k]].items() if key not in LABEL_KEYS}
            m = float(margin[k])
            row["score"] = {
                "margin": m,
                "p_first": float(0.5 * (1 + np.tanh(0.5 * m))),
                "uncertainty": float(u[k]),
                "diverse": diverse,
            }
            row["pool_row"] = rows[k]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
