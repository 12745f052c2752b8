"""The text checks: rows by format, bad rows, empty completions, chosen == rejected, duplicates,
conflicts, length bias. No tokenizer needed.

Rows are parsed by the training parser (:func:`preftune.data.formats.parse_rows` with
``skip_bad_rows``, see :mod:`preftune.doctor.checkup`), so a bad row gets exactly the one-line error
training would print. Conversational rows need a chat template to
become text; without a tokenizer they are rendered as ``role: content`` lines (:class:`PlainChat`),
which is enough for the text checks.

Definitions (texts compared after collapsing whitespace, :func:`~preftune.doctor.text.normalize`):

* empty completion: chosen or rejected is empty or only whitespace (training scores EOS alone);
* chosen == rejected: the same text on both sides (training drops the pair: no gradient);
* exact duplicate pair: same prompt, chosen and rejected as an earlier row;
* conflict: the same prompt and the same two replies, preferred the other way round in some row
  (chosen and rejected swapped, or a soft label on the other side of 1/2; ties do not count);
  every row of such a group is listed (the data cannot say which label is right);
* near duplicate: estimated Jaccard similarity of word 3-gram sets >= ``near_threshold``
  (MinHash, :mod:`preftune.doctor.text`); for whole pairs the shingles of chosen and rejected are
  tagged with their side, so a swapped pair is not a near duplicate (it is a conflict).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preftune.data.formats import PreferencePair, _is_messages
from preftune.data.io import Unparsable
from preftune.data.rows import message_text
from preftune.doctor.stats import length_bias
from preftune.doctor.text import MinHasher, NearDuplicates, ngrams, normalize, text_key

SHINGLE = 3  # words
_CHOSEN_TAG, _REJECTED_TAG = 0x5A5A5A5A5A5A5A5A, 0x3C3C3C3C3C3C3C3C


class PlainChat:
    """A stand-in chat template for the text checks: each message as a ``role: content`` line."""

    chat_template = "role: content"

    @staticmethod
    def apply_chat_template(
        messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        text = "".join(f"{m['role']}: {message_text(m)}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def format_of(fields: Any) -> str:
    """The format a raw row is written in (the module docstring of preftune.data.formats lists them)."""
    if isinstance(fields, Unparsable):
        return "unparsable"
    if not isinstance(fields, dict):
        return "not an object"
    if "chosen" in fields or "rejected" in fields:
        if _is_messages(fields.get("chosen")) or _is_messages(fields.get("rejected")):
            return "conversational"
        return "standard" if fields.get("prompt") is not None else "implicit prompt"
    if "completion" in fields and "label" in fields:
        return "unpaired (KTO)"
    return "unknown"


@dataclass
class TextChecks:
    """Accumulates the text checks row by row; ``summary()`` gives the JSON-ready findings."""

    near_threshold: float = 0.8
    num_perm: int = 64
    rows: list[int] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    bad: list[tuple[int, str]] = field(default_factory=list)
    bad_reasons: dict[str, int] = field(default_factory=dict)
    empty: list[int] = field(default_factory=list)
    identical: list[int] = field(default_factory=list)
    _lengths: list[tuple[int, int, int]] = field(default_factory=list)
    _soft: list[int] = field(default_factory=list)
    _ties: list[int] = field(default_factory=list)
    _prompts: dict[bytes, list[int]] = field(default_factory=dict)
    _pairs: dict[bytes, list[int]] = field(default_factory=dict)
    _unordered: dict[bytes, dict[bool, list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._minhash = MinHasher(self.num_perm)
        self._near_prompts = NearDuplicates(self.near_threshold)
        self._near_pairs = NearDuplicates(self.near_threshold)

    def add_bad(self, row: int, message: str) -> None:
        self.bad.append((row, message))

    def add(self, row: int, pair: PreferencePair) -> None:
        self.rows.append(row)
        self._lengths.append((len(pair.prompt), len(pair.chosen), len(pair.rejected)))
        if not pair.chosen.strip() or not pair.rejected.strip():
            self.empty.append(row)
        if pair.chosen == pair.rejected:
            self.identical.append(row)
        if pair.preference < 1.0:
            self._soft.append(row)
        if pair.preference == 0.5:
            self._ties.append(row)
        # a prompt is its text and its images (by content): the same question about other images differs
        prompt = pair.prompt + "".join(f"\x00image {ref.digest}" for ref in pair.images)
        self._prompts.setdefault(text_key(prompt), []).append(row)
        self._pairs.setdefault(text_key(prompt, pair.chosen, pair.rejected), []).append(row)
        c, r = normalize(pair.chosen), normalize(pair.rejected)
        if pair.preference != 0.5:  # the side a row prefers: its chosen unless preference < 1/2
            sides = self._unordered.setdefault(text_key(prompt, *sorted((c, r))), {})
            sides.setdefault((c < r) != (pair.preference < 0.5), []).append(row)
        prompt_sig = self._minhash.signature(ngrams(prompt, SHINGLE))
        completions = np.concatenate(
            [ngrams(pair.chosen, SHINGLE, tag=_CHOSEN_TAG), ngrams(pair.rejected, SHINGLE, tag=_REJECTED_TAG)]
        )
        self._near_prompts.add(row, prompt_sig)
        self._near_pairs.add(row, np.minimum(prompt_sig, self._minhash.signature(completions)))

    @property
    def lengths(self) -> np.ndarray:
        """``[n, 3]`` character lengths of (prompt, chosen, rejected) of the parsed pairs."""
        return np.array(self._lengths, dtype=np.int64).reshape(-1, 3)

    def conflicts(self) -> list[list[int]]:
        return sorted(
            (sorted(s[True] + s[False]) for s in self._unordered.values() if len(s) == 2), key=lambda g: g[0]
        )

    def summary(self) -> dict[str, Any]:
        n = len(self.rows)
        total = n + len(self.bad)
        prompt_groups = [g for g in self._prompts.values() if len(g) > 1]
        pair_groups = [g for g in self._pairs.values() if len(g) > 1]
        conflicts = self.conflicts()
        in_conflict = {r for g in conflicts for r in g}
        near_prompts, near_pairs = self._near_prompts.clusters(), self._near_pairs.clusters()
        lengths = self.lengths
        return {
            "rows": total,
            "pairs": n,
            "formats": dict(self.formats.most_common()),
            "bad_rows": {
                "count": len(self.bad),
                "by_reason": self.bad_reasons,
                "rows": [r for r, _ in self.bad],
                "messages": [m for _, m in self.bad],
            },
            "empty_completions": {"count": len(self.empty), "rows": self.empty},
            "chosen_equals_rejected": {"count": len(self.identical), "rows": self.identical},
            "soft_labels": {"count": len(self._soft), "ties": len(self._ties), "tie_rows": self._ties},
            "exact_duplicates": {
                "prompts": _groups(prompt_groups, n),
                "pairs": {**_groups(pair_groups, n), **_repeats(pair_groups, skip=in_conflict)},
            },
            "near_duplicates": {
                "threshold": self.near_threshold,
                "shingle_words": SHINGLE,
                "prompts": _groups(near_prompts, n),
                "pairs": {**_groups(near_pairs, n), **_repeats(near_pairs)},
            },
            "conflicts": {
                "groups": len(conflicts),
                "rows": [r for g in conflicts for r in g],
                "of": [g[0] for g in conflicts for _ in g],
                "examples": conflicts[:10],
            },
            "length_bias": {"chars": length_bias(lengths[:, 1], lengths[:, 2])},
        }


def _repeats(groups: list[list[int]], skip: set[int] = frozenset()) -> dict[str, list[int]]:
    """``rows``: every row after the first of its group (except those in ``skip``); ``of``: that first row."""
    pairs = sorted((r, g[0]) for g in groups for r in g[1:] if r not in skip)
    return {"rows": [r for r, _ in pairs], "of": [f for _, f in pairs]}


def _groups(groups: list[list[int]], n: int) -> dict[str, Any]:
    """Counts of duplicate groups: groups, rows beyond the first of each, their share, examples."""
    excess = sum(len(g) - 1 for g in groups)
    return {
        "groups": len(groups),
        "excess": excess,
        "share": excess / n if n else 0.0,
        "largest": max((len(g) for g in groups), default=0),
        "examples": [g[:10] for g in groups[:10]],
    }
