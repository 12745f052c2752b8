"""Token checks under the training budgets: lengths, truncation, identical-after-truncation, padding.

Each chunk of pairs is tokenized once by :class:`~preftune.data.tokenize.PairTokenizer` with no
budgets (the full lengths), and the training budgets are then applied to those ids by the same
tokenizer's own fitting step, so the counts are those training reports: a pair is *truncated* when
any of its three parts loses tokens, and *dropped* when chosen and rejected ids are equal after
truncation (training never sees it).

Padding per layout: the kept pairs are batched as training batches them (the seeded permutation of
:func:`preftune.engine.loop.step_indices`, ``batch_size`` pairs per batch) and each batch is built by
:func:`preftune.data.batching.collate` in each layout (token ids replaced by placeholders of the same
lengths). ``padding = 1 - real tokens / (rows x width)`` over the first ``max_batches`` batches;
``positions_per_pair = rows x width / pairs`` is the compute a pair costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preftune.data.formats import PreferencePair
from preftune.data.images import ImageInputs
from preftune.data.tokenize import Budgets, PairTokenizer, TokenizedPair
from preftune.doctor.stats import length_bias, quantiles

LAYOUTS = ("padded", "packed", "prefix_shared")


@dataclass
class TokenChecks:
    """Accumulates the token checks chunk by chunk (``add``); ``summary()`` gives the findings."""

    tokenizer: Any
    budgets: Budgets
    batch_size: int = 8
    layouts: Sequence[str] = LAYOUTS
    pack_length: int | None = None
    seed: int = 0
    max_batches: int = 16
    rows: list[int] = field(default_factory=list)  # the rows measured, in order
    full: list[tuple[int, int, int]] = field(default_factory=list)  # untruncated (prompt, chosen, rejected)
    fitted: list[tuple[int, int, int]] = field(default_factory=list)  # after the budgets
    truncated: list[int] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "chosen": 0, "rejected": 0})
    dropped: list[int] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    images: ImageInputs | None = None  # an image-text model's: prompts hold their images' tokens
    images_cut: list[int] = field(default_factory=list)  # rows whose images the prompt budget would cut

    def __post_init__(self) -> None:
        self._whole = PairTokenizer(self.tokenizer, Budgets(None, None, None), self.images)
        self._budgeted = PairTokenizer(self.tokenizer, self.budgets, self.images)

    def add(self, rows: Sequence[int], pairs: Sequence[PreferencePair]) -> list[int]:
        """Tokenize a chunk; returns the rows that tokenized (the others are recorded in ``errors``)."""
        try:
            data = self._whole.tokenize(pairs)
        except ValueError:  # one bad prompt fails the chunk: find it pair by pair
            ok = []
            for row, pair in zip(rows, pairs):
                try:
                    self._whole.tokenize([pair])
                    ok.append((row, pair))
                except ValueError as e:
                    self.errors.append((row, str(e)))
            if not ok:
                return []
            rows, pairs = [r for r, _ in ok], [p for _, p in ok]
            data = self._whole.tokenize(pairs)
        by_origin = {p.origin: p for p in data.pairs}
        for row, pair in zip(rows, pairs):
            tp = by_origin.get(pair.origin)
            if tp is None:  # chosen == rejected, or the same ids even untruncated: dropped, not measured
                self.dropped.append(row)
                continue
            self.rows.append(row)
            p, c, r = list(tp.prompt_ids), list(tp.chosen_ids), list(tp.rejected_ids)
            p_fit, c_fit = self._budgeted._fit(p, c)
            _, r_fit = self._budgeted._fit(p, r)
            self.full.append((len(p), len(c), len(r)))
            self.fitted.append((len(p_fit), len(c_fit), len(r_fit)))
            if (p_fit, c_fit, r_fit) != (p, c, r):
                self.truncated.append(row)
                self.cut["prompt"] += len(p_fit) < len(p)
                self.cut["chosen"] += len(c_fit) < len(c)
                self.cut["rejected"] += len(r_fit) < len(r)
            if c_fit == r_fit:
                self.dropped.append(row)
            if self._budgeted._images_cut(p, p_fit):  # training drops the pair: it never cuts an image
                self.images_cut.append(row)
        return list(rows)

    def padding(self) -> dict[str, dict[str, float]]:
        """Padding fraction and positions per pair of each layout over real training batches."""
        from preftune.data.batching import collate
        from preftune.engine.steps import step_indices

        dropped = set(self.dropped)
        kept = [f for f, row in zip(self.fitted, self.rows) if row not in dropped]
        if not kept:
            return {}
        pairs = [TokenizedPair((1,) * p, (2,) * c, (3,) * r) for p, c, r in kept]
        steps = min(self.max_batches, -(-len(pairs) // self.batch_size))
        batches = [step_indices(len(pairs), self.batch_size, self.seed, s) for s in range(steps)]
        out = {}
        for layout in self.layouts:
            real = positions = count = 0
            for idx in batches:
                pack = None if layout == "padded" else self.pack_length
                batch = collate([pairs[i] for i in idx], layout=layout, pack_length=pack)
                real += batch.num_real_tokens
                positions += batch.input_ids.numel()
                count += len(idx)
            out[layout] = {
                "padding": 1 - real / positions,
                "positions_per_pair": positions / count,
                "batches": len(batches),
            }
        return out

    def summary(self) -> dict[str, Any]:
        full = np.array(self.full, dtype=np.int64).reshape(-1, 3)
        fitted = np.array(self.fitted, dtype=np.int64).reshape(-1, 3)
        n = len(full)
        b = self.budgets
        limit = getattr(self.tokenizer, "model_max_length", None)
        warnings = []
        if b.max_length is not None and isinstance(limit, int) and limit < b.max_length:
            warnings.append(f"max_length {b.max_length} exceeds the tokenizer's model_max_length {limit}")
        return {
            "budgets": {
                "max_length": b.max_length,
                "max_prompt_length": b.max_prompt_length,
                "max_completion_length": b.max_completion_length,
            },
            "pairs": n,
            "lengths": {
                part: quantiles(full[:, k]) for k, part in enumerate(("prompt", "chosen", "rejected"))
            },
            "lengths_after_budgets": {
                part: quantiles(fitted[:, k]) for k, part in enumerate(("prompt", "chosen", "rejected"))
            },
            "truncated": {
                "count": len(self.truncated),
                "share": len(self.truncated) / n if n else 0.0,
                "by_part": dict(self.cut),
                "rows": self.truncated,
            },
            "dropped_identical": {"count": len(self.dropped), "rows": self.dropped},
            "errors": {
                "count": len(self.errors),
                "rows": [r for r, _ in self.errors],
                "messages": [m for _, m in self.errors],
            },
            "length_bias": length_bias(full[:, 1], full[:, 2]) if n else {"pairs": 0},
            "suggested_budgets": _suggested(full),
            "padding": self.padding(),
            "batch_size": self.batch_size,
            "warnings": warnings,
            "model_max_length": limit if isinstance(limit, int) and limit < 1 << 40 else None,
        }


def _suggested(full: np.ndarray) -> dict[str, int]:
    """Budgets that cut at most 1% of pairs: the 99th percentiles of the prompt and of the longest
    sequence (prompt + the longer completion)."""
    if not len(full):
        return {}
    prompt = int(np.ceil(np.quantile(full[:, 0], 0.99)))
    total = int(np.ceil(np.quantile(full[:, 0] + full[:, 1:].max(axis=1), 0.99)))
    return {"max_prompt_length": prompt, "max_length": max(total, prompt + 1)}
