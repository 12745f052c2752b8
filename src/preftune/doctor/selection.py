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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.formats import _RowParser, parse_rows
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
    u = uncertainty(np.asarray(margins, dtype=float))
    order = [int(k) for k in np.argsort(-np.nan_to_num(u, nan=-1.0), kind="stable") if not np.isnan(u[k])]
    minhash = MinHasher()
    picked: list[tuple[int, bool]] = []
    sigs: list[np.ndarray] = []
    skipped: list[int] = []
    for k in order:
        if len(picked) >= budget:
            break
        sig = minhash.signature(ngrams(prompts[k], SHINGLE))
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
    raws: dict[str, Any] = {}
    loaded = parse_rows(
        (raws.setdefault(_RowParser(raw, None).origin, raw) for raw in read_rows(pool)),
        kind="paired",
        tokenizer=scorer.tokenizer,
        skip_bad_rows=True,
    )
    if not loaded.pairs:
        raise ValueError(f"{pool}: no usable candidate pairs")
    chunk = 256
    margins = np.concatenate(
        [scorer.margins(loaded.pairs[i : i + chunk]) for i in range(0, len(loaded.pairs), chunk)]
    )
    picks = select_pairs([p.prompt for p in loaded.pairs], margins, budget, max_similarity=max_similarity)
    u = uncertainty(margins)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wt", encoding="utf-8") as f:
        for k, diverse in picks:
            raw = raws[loaded.pairs[k].origin]
            row = {key: v for key, v in raw.fields.items() if key not in LABEL_KEYS}
            m = float(margins[k])
            row["score"] = {
                "margin": m,
                "p_first": float(0.5 * (1 + np.tanh(0.5 * m))),
                "uncertainty": float(u[k]),
                "diverse": diverse,
            }
            row["pool_row"] = raw.row
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "out": str(out),
        "candidates": len(loaded.pairs),
        "picked": len(picks),
        "bad_rows_skipped": len(loaded.skipped),
        "bad_rows": loaded.skipped,  # each naming file, row and field
        "scorer": scorer.description,
        "mean_uncertainty": float(np.mean([u[k] for k, _ in picks])) if picks else 0.0,
        "pool_mean_uncertainty": float(np.nanmean(u)),
    }
