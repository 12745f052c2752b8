"""Train/eval prompt contamination by word n-grams.

With G(x) the set of word ``n``-grams of prompt x (the whole prompt as one n-gram when it is
shorter), E = union of G over the eval prompts and T = union over the training prompts:

* a training row is contaminated when |G(x) n E| / |G(x)| >= ``threshold`` (mostly eval text) or
  |G(x) n G(e)| / |G(e)| >= ``threshold`` for some eval prompt e (it contains most of e);
* an eval row is contaminated when |G(e) n T| / |G(e)| >= ``threshold``.

The eval n-grams are held in memory (a sorted array); of the training n-grams only those that hit E
are kept, so memory stays at the eval set's size however large the training set is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preftune.doctor.text import ngrams


@dataclass
class Contamination:
    eval_prompts: list[tuple[int, str]]  # (row, prompt) of the eval file
    n: int = 8
    threshold: float = 0.5
    train_rows: list[int] = field(default_factory=list)
    overlaps: list[float] = field(default_factory=list)
    _hits: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._eval = [(row, np.unique(ngrams(p, self.n))) for row, p in self.eval_prompts]
        nonempty = [g for _, g in self._eval if len(g)]
        self._eval_set = np.unique(np.concatenate(nonempty)) if nonempty else np.zeros(0, dtype=np.uint64)
        self._owners: dict[int, list[int]] = {}  # n-gram -> the eval prompts (indices) holding it
        for k, (_, grams) in enumerate(self._eval):
            for g in grams.tolist():
                self._owners.setdefault(g, []).append(k)

    def add(self, row: int, prompt: str) -> None:
        grams = np.unique(ngrams(prompt, self.n))
        if len(grams) == 0:
            return
        hit = np.isin(grams, self._eval_set, assume_unique=True)
        overlap = float(hit.mean())
        if overlap > 0:
            self._hits.append(grams[hit])
            shared: dict[int, int] = {}
            for g in grams[hit].tolist():
                for k in self._owners[g]:
                    shared[k] = shared.get(k, 0) + 1
            overlap = max(overlap, max(c / len(self._eval[k][1]) for k, c in shared.items()))
        if overlap >= self.threshold:
            self.train_rows.append(row)
            self.overlaps.append(overlap)

    def summary(self) -> dict[str, Any]:
        seen = np.unique(np.concatenate(self._hits)) if self._hits else np.zeros(0, dtype=np.uint64)
        eval_rows, eval_overlap = [], []
        for row, grams in self._eval:
            if len(grams):
                share = float(np.isin(grams, seen, assume_unique=True).mean())
                eval_overlap.append(share)
                if share >= self.threshold:
                    eval_rows.append(row)
        n_eval = len(self._eval)
        return {
            "ngram": self.n,
            "threshold": self.threshold,
            "eval_prompts": n_eval,
            "eval_contaminated": {
                "count": len(eval_rows),
                "share": len(eval_rows) / n_eval if n_eval else 0.0,
                "rows": eval_rows,
            },
            "mean_eval_overlap": float(np.mean(eval_overlap)) if eval_overlap else 0.0,
            "train_contaminated": {
                "count": len(self.train_rows),
                "rows": self.train_rows,
                "overlap": [round(x, 4) for x in self.overlaps],
            },
        }
