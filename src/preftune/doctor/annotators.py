"""Several annotators judging the same pairs: reliabilities and soft labels (Dawid-Skene, one coin).

Input: preference rows (any training format) with an ``annotator`` and optionally a ``pair_id``;
rows with the same ``pair_id`` (or, without one, the same prompt and the same two replies in either
order) are judgments of one pair. Each pair i gets a fixed orientation (a_i, b_i): the chosen and
rejected of its first row. Judgment y_ij = 1 when annotator j chose a_i (a row with
``preference`` p < 1/2 counts as choosing its rejected side; p = 1/2, or chosen == rejected, is a
tie and is not used). Rows training would reject are skipped and counted.

Model (Dawid & Skene 1979, the binary "one-coin" case): the true label z_i = 1[a_i beats b_i] has
prior 1/2 (the orientation is arbitrary); annotator j reports the truth with probability q_j, its
reliability. EM from the majority vote:

* E-step, a Bradley-Terry score per pair: L_i = sum_j (2 y_ij - 1) * logit(q_j) is the log-odds
  that a_i is better, so r(a_i) - r(b_i) = L_i and mu_i = P(z_i = 1 | y) = sigmoid(L_i) -- a vote in
  which each annotator weighs logit(q_j) (a coin-flipper 0, an adversary negative);
* M-step: q_j = (1 + sum_i [y_ij mu_i + (1 - y_ij)(1 - mu_i)]) / (2 + n_j), the expected share of
  agreements with a Beta(1, 1) prior (so q stays in (0, 1)).

The aggregated row is the pair with ``chosen`` the side with mu >= 1/2 and ``preference`` =
max(mu, 1 - mu), the posterior probability that chosen is better, as `preftune dpo` reads it.

Reported per annotator: judgments, reliability q_j, agreement with the aggregated label, and
agreement with the majority of the *other* annotators on the same pairs (ties skipped).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.formats import LoadedData, iter_rows_and_examples
from preftune.data.io import read_rows
from preftune.doctor.scan import PlainChat
from preftune.doctor.text import normalize

JUDGE_KEYS = ("annotator", "pair_id", "preference")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class DawidSkene:
    """Posterior P(a_i better) per pair, reliability per annotator, EM iterations used."""

    posterior: np.ndarray
    reliability: np.ndarray
    n_iter: int


def majority_vote(item: np.ndarray, y: np.ndarray, n_items: int) -> np.ndarray:
    """Share of judgments for a_i per pair (1/2 on a tie or with no judgment)."""
    votes = np.bincount(item, weights=y, minlength=n_items)
    count = np.bincount(item, minlength=n_items)
    return np.where(count > 0, votes / np.maximum(count, 1), 0.5)


def dawid_skene(
    item: np.ndarray,
    annotator: np.ndarray,
    y: np.ndarray,
    n_items: int,
    n_annotators: int,
    *,
    max_iter: int = 200,
    tol: float = 1e-8,
) -> DawidSkene:
    """One-coin Dawid-Skene EM on binary judgments ``y[k]`` of pair ``item[k]`` by ``annotator[k]``
    (formulas in the module docstring), started from the majority vote."""
    item, annotator, y = np.asarray(item), np.asarray(annotator), np.asarray(y, dtype=float)
    mu = majority_vote(item, y, n_items)
    n_j = np.bincount(annotator, minlength=n_annotators)
    q, step, it = np.full(n_annotators, 0.5), np.inf, 0
    while step >= tol and it < max_iter:
        agree = y * mu[item] + (1 - y) * (1 - mu[item])
        q_new = (1 + np.bincount(annotator, weights=agree, minlength=n_annotators)) / (2 + n_j)
        w = np.log(q_new) - np.log1p(-q_new)
        mu = _sigmoid(np.bincount(item, weights=(2 * y - 1) * w[annotator], minlength=n_items))
        step, q, it = np.abs(q_new - q).max(), q_new, it + 1
    return DawidSkene(mu, q, it)


@dataclass
class Judgments:
    """Judgment arrays and what they refer to: pair keys, the first raw row of each pair, names."""

    item: np.ndarray
    annotator: np.ndarray
    y: np.ndarray
    names: list[str]
    first_rows: list[dict]  # raw fields of each pair's first row (its orientation a, b)
    ties: int = 0
    bad_rows: list[str] = field(default_factory=list)  # training's messages for rows that did not parse


def _pair_key(prompt: str, chosen: str, rejected: str) -> tuple[str, frozenset[str]]:
    return normalize(prompt), frozenset((normalize(chosen), normalize(rejected)))


def read_judgments(path: str | Path) -> Judgments:
    """Parse judgment rows with the training parser, one at a time (bad rows are counted), into
    :class:`Judgments`; what is kept per row is its judgment, and the fields of each pair's first row."""
    skips = LoadedData()
    pairs = iter_rows_and_examples(read_rows(path), kind="paired", tokenizer=PlainChat(), skip_bad_rows=True,
                                   skips=skips)
    items: dict[Any, int] = {}
    names: dict[str, int] = {}
    item, annotator, y, first, ties = [], [], [], [], 0
    orientation: list[str] = []
    for raw, pair in pairs:
        fields = raw.fields
        who = fields.get("annotator")
        if who is None or (isinstance(who, str) and not who.strip()):
            raise ValueError(
                f"{pair.origin}: field 'annotator': missing (each row is one annotator's judgment)"
            )
        key = (
            ("id", str(fields["pair_id"]))
            if fields.get("pair_id") is not None
            else _pair_key(pair.prompt, pair.chosen, pair.rejected)
        )
        if key not in items:
            items[key] = len(items)
            first.append({k: v for k, v in fields.items() if k not in JUDGE_KEYS})
            orientation.append(normalize(pair.chosen))
        i = items[key]
        if pair.preference == 0.5 or normalize(pair.chosen) == normalize(pair.rejected):
            ties += 1
            continue
        picked_first = normalize(pair.chosen) == orientation[i]
        if (
            fields.get("pair_id") is not None
            and not picked_first
            and normalize(pair.rejected) != orientation[i]
        ):
            raise ValueError(
                f"{pair.origin}: field 'pair_id': pair {fields['pair_id']!r} has other replies "
                "than its first row"
            )
        item.append(i)
        annotator.append(names.setdefault(str(who), len(names)))
        y.append(float(picked_first == (pair.preference > 0.5)))
    if not item:
        raise ValueError(f"{path}: no judgments (every row is a tie?)")
    return Judgments(
        np.array(item), np.array(annotator), np.array(y), list(names), first, ties, skips.skipped
    )


def annotator_table(j: Judgments, ds: DawidSkene) -> list[dict[str, Any]]:
    """Per annotator: judgments, reliability, agreement with the aggregate and with the others' majority."""
    n_items = len(j.first_rows)
    label = ds.posterior[j.item] >= 0.5
    votes = np.bincount(j.item, weights=j.y, minlength=n_items)
    count = np.bincount(j.item, minlength=n_items)
    rows = []
    for a, name in enumerate(j.names):
        mine = j.annotator == a
        others_n = count[j.item[mine]] - 1
        others_share = (votes[j.item[mine]] - j.y[mine]) / np.maximum(others_n, 1)
        usable = (others_n > 0) & (others_share != 0.5)
        with_others = ((others_share > 0.5) == (j.y[mine] == 1))[usable]
        rows.append(
            {
                "annotator": name,
                "judgments": int(mine.sum()),
                "reliability": float(ds.reliability[a]),
                "agrees_with_aggregate": float(((j.y[mine] == 1) == label[mine]).mean()),
                "agrees_with_others_majority": float(with_others.mean()) if len(with_others) else None,
            }
        )
    return sorted(rows, key=lambda r: -r["reliability"])


def aggregate_file(
    path: str | Path, out: str | Path, *, max_iter: int = 200, report: str | Path | None = None
) -> dict[str, Any]:
    """Read judgments, fit Dawid-Skene, write one standard row per pair to ``out`` (JSONL)."""
    out = Path(out)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"--out {out}: aggregated pairs are written as .jsonl or .jsonl.gz")
    j = read_judgments(path)
    n_items = len(j.first_rows)
    ds = dawid_skene(j.item, j.annotator, j.y, n_items, len(j.names), max_iter=max_iter)
    count = np.bincount(j.item, minlength=n_items)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wt", encoding="utf-8") as f:
        for i, fields in enumerate(j.first_rows):
            row, mu = dict(fields), float(ds.posterior[i])
            if mu < 0.5:
                row["chosen"], row["rejected"] = fields["rejected"], fields["chosen"]
            row["preference"] = round(max(mu, 1 - mu), 6)
            row["judgments"] = int(count[i])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    result = {
        "pairs": n_items,
        "judgments": len(j.y),
        "ties_skipped": j.ties,
        "bad_rows_skipped": len(j.bad_rows),
        "first_bad_row": j.bad_rows[0] if j.bad_rows else None,
        "em_iterations": ds.n_iter,
        "annotators": annotator_table(j, ds),
        "majority_vote_disagreements": int(
            ((majority_vote(j.item, j.y, n_items) > 0.5) != (ds.posterior >= 0.5)).sum()
        ),
    }
    if report:
        Path(report).write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_annotators(result: dict[str, Any]) -> str:
    """The per-annotator table as aligned text."""
    head = ("annotator", "judgments", "reliability", "agrees w/ aggregate", "agrees w/ others' majority")
    rows = [head] + [
        (
            r["annotator"],
            str(r["judgments"]),
            f"{r['reliability']:.3f}",
            f"{r['agrees_with_aggregate']:.3f}",
            "-" if r["agrees_with_others_majority"] is None else f"{r['agrees_with_others_majority']:.3f}",
        )
        for r in result["annotators"]
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = [
        "  ".join(s.ljust(w) if c == 0 else s.rjust(w) for c, (s, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + (
        f"\nlabels that differ from the majority vote: {result['majority_vote_disagreements']}"
        f"; ties skipped: {result['ties_skipped']}; bad rows skipped: {result['bad_rows_skipped']}"
        + (f" (first: {result['first_bad_row']})" if result["first_bad_row"] else "")
    )
