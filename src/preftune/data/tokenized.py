"""Token-id pairs and what happened on the way to them: the data every trainer reads.

:class:`TokenizedPair` is one pair's ids (``chosen``/``rejected`` continue the prompt), label and
masks; :class:`TokenizedData` holds a sequence of them (a list, or a memory-mapped
:class:`~preftune.data.store.PairStore`) and the counters of pairs left out, truncated or empty;
:func:`fingerprint_of` identifies the data for run identities and caches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from preftune.data.images import ImageRef


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. ``chosen_ids``/``rejected_ids`` continue ``prompt_ids``.

    For unpaired (KTO) data, ``chosen_ids`` is the labelled completion, ``rejected_ids`` the next
    example's completion (the mismatched pair for KTO's KL estimate) and ``preference`` the label.
    """

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    preference: float = 1.0
    origin: str = ""
    margin: float = 0.0
    # which ``chosen_ids`` are scored (SFT: assistant turns only); None = every token
    chosen_mask: tuple[bool, ...] | None = None
    images: tuple[ImageRef, ...] = ()  # the prompt's images, in order
    # where in prompt_ids their features go (all tokens_per_image of each)
    image_positions: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) * 2 + len(self.chosen_ids) + len(self.rejected_ids)


DROP_REASONS = {
    "dropped_equal": "chosen == rejected",
    "dropped_identical": "chosen and rejected identical after tokenization/truncation",
    "dropped_untrained": "no trained token left after truncation",
    "dropped_images": "the prompt's image tokens do not fit max_prompt_length",
}


@dataclass
class TokenizedData:
    """Token pairs, and what happened on the way: the counters of :data:`DROP_REASONS` (pairs left
    out), ``truncated`` (kept or not) and ``empty_completions`` (completions of kept pairs that are
    EOS alone; for unpaired data the labelled completion only)."""

    pairs: list[TokenizedPair] = field(default_factory=list)
    dropped_identical: int = 0
    truncated: int = 0
    dropped_untrained: int = 0  # SFT examples with no trained token left after truncation
    dropped_equal: int = 0
    dropped_images: int = 0  # pairs whose image tokens do not fit the prompt budget
    empty_completions: int = 0
    first_dropped: str = ""  # "origin: reason" of the first pair left out

    def drop(self, counter: str, origin: str) -> None:
        """Count one pair left out for the reason ``counter`` (a key of DROP_REASONS)."""
        setattr(self, counter, getattr(self, counter) + 1)
        if not self.first_dropped:
            self.first_dropped = f"{origin}: {DROP_REASONS[counter]}" if origin else DROP_REASONS[counter]

    def drops(self) -> dict[str, int]:
        """Reason -> number of pairs left out, for the reasons that occurred."""
        return {reason: getattr(self, k) for k, reason in DROP_REASONS.items() if getattr(self, k)}

    def fingerprint(self) -> str:
        """A hash of every token id, label and loss mask, for cache keys (:func:`fingerprint_of`)."""
        return fingerprint_of(self.pairs)

    def merge(self, other: TokenizedData) -> None:
        """Add ``other``'s counters to this one's (its pairs are the caller's to keep)."""
        for name in ("dropped_identical", "truncated", "dropped_untrained", "dropped_equal", "dropped_images",
                     "empty_completions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_dropped = self.first_dropped or other.first_dropped


def pair_key(pair: TokenizedPair) -> bytes:
    """What identifies a pair's training signal: ids, label, margin, and the loss mask and images
    where set (so fingerprints of data without them are unchanged)."""
    key: tuple = (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.preference, pair.margin)
    if pair.chosen_mask is not None:
        key += (pair.chosen_mask,)
    if pair.images:  # the pixels, by content
        key += (tuple(i.digest for i in pair.images), pair.image_positions)
    return repr(key).encode()


def fingerprint_of(pairs: Sequence[TokenizedPair]) -> str:
    """A sequence's own fingerprint where it keeps one (a :class:`~preftune.data.store.PairStore`),
    else the sha256 of every pair's :func:`pair_key` in order (what a store computes as it is written)."""
    own = getattr(pairs, "fingerprint", None)
    if callable(own):
        return own()
    h = hashlib.sha256()
    for p in pairs:
        h.update(pair_key(p))
    return h.hexdigest()
