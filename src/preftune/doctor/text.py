"""Text fingerprints for the data doctor: exact keys, MinHash signatures with LSH, word n-grams.

All hashes are stable (no ``PYTHONHASHSEED`` dependence), so results repeat from run to run.

Words (:func:`words`): the lower-cased UTF-8 text split at whitespace and ASCII punctuation, each
word hashed with CRC-32. A word n-gram's hash combines its words, ``s = sum_j w_{i+j} P^j``
(mod 2^64); the shingles of a text for near duplicates are its word 3-grams.

MinHash (Broder 1997). With ``K`` random odd multipliers ``a_k`` and offsets ``b_k``, permutation
k maps a shingle s to ``h_k(s) = ((a_k s + b_k) mod 2^64) >> 32`` and the signature is
``sig_k = min_s h_k(s)``. For two sets A, B, ``P(sig_k(A) = sig_k(B)) ~ J(A, B) = |A n B| / |A u B|``,
so the fraction of equal entries estimates the Jaccard similarity. The signature of a union is the
elementwise minimum.

LSH: the K entries are cut into ``bands`` bands of ``r = K / bands`` rows; two texts become
candidates when some band is equal, with probability ``1 - (1 - J^r)^bands`` (64 = 16 x 4: 0.9998
at J = 0.8, 0.64 at J = 0.5). A candidate is accepted when its estimated J >= threshold.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np

_P = np.uint64(0x100000001B3)  # FNV prime, combines word hashes into n-gram hashes
_EMPTY = np.full(0, 0, dtype=np.uint64)


def normalize(text: str) -> str:
    """Whitespace collapsed to single spaces, ends stripped: the key of 'exact' comparisons."""
    return " ".join(text.split())


def text_key(*parts: str) -> bytes:
    """A 16-byte digest of the normalized parts (exact duplicates share it)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(normalize(part).encode())
        h.update(b"\x00")
    return h.digest()


_PUNCT = bytes.maketrans(
    bytes(range(33, 48)) + bytes(range(58, 65)) + bytes(range(91, 95)) + b"`{|}~", b" " * 31
)


def words(text: str) -> np.ndarray:
    """CRC-32 hashes (made odd) of the words of the lower-cased text: runs of bytes that are not
    whitespace or ASCII punctuation (``_`` belongs to words)."""
    tokens = text.lower().encode().translate(_PUNCT).split()
    if not tokens:
        return _EMPTY
    return np.fromiter(map(zlib.crc32, tokens), dtype=np.uint64, count=len(tokens)) | np.uint64(1)


def ngrams(text: str, n: int, *, tag: int = 0) -> np.ndarray:
    """Hashes of the word ``n``-grams (the whole text as one n-gram when it has 1..n-1 words);
    ``tag`` is XORed in to keep the n-grams of different fields apart."""
    w = words(text)
    if len(w) == 0:
        return _EMPTY
    m = max(len(w) - n + 1, 1)
    out = np.zeros(m, dtype=np.uint64)
    power = np.uint64(1)
    with np.errstate(over="ignore"):
        for j in range(min(n, len(w))):
            out += w[j : j + m] * power
            power *= _P
    return out ^ np.uint64(tag) if tag else out


class MinHasher:
    """``K``-permutation MinHash signatures of hashed shingles (see the module docstring)."""

    def __init__(self, num_perm: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(1, 2**63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """``[K]`` uint32 signature; an empty set gets all-ones (so empty texts match each other)."""
        if len(shingles) == 0:
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        with np.errstate(over="ignore"):
            h = (self.a[:, None] * shingles[None, :] + self.b[:, None]) >> np.uint64(32)
        return h.min(axis=1).astype(np.uint32)


@dataclass
class NearDuplicates:
    """Near-duplicate clustering: ``add(item, sig)`` keeps the signature (``[K]`` uint32: 4K bytes an
    item, nothing else); :meth:`clusters` links each item to the earlier ones whose estimated Jaccard
    is >= ``threshold``, the candidates being, in each band, the first ``bucket_cap`` items of its
    bucket (so the cost per item is bounded). Clusters are connected components."""

    threshold: float = 0.8
    bands: int = 16
    bucket_cap: int = 4
    _sigs: np.ndarray | None = None
    _items: list[int] = field(default_factory=list)

    def add(self, item: int, sig: np.ndarray) -> None:
        k = len(self._items)
        if self._sigs is None:
            self._sigs = np.empty((1024, len(sig)), dtype=sig.dtype)
        elif k == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[k] = sig
        self._items.append(item)

    def _links(self) -> np.ndarray:
        """``[L, 2]`` int32 (item, earlier candidate) positions whose signatures agree in >= threshold
        of their entries (a link may appear once per band it was found in)."""
        n = len(self._items)
        sigs = self._sigs[:n]
        width, need = sigs.shape[1] // self.bands, self.threshold * sigs.shape[1]
        accepted = [np.zeros((0, 2), dtype=np.int32)]
        for b in range(self.bands):
            band = sigs[:, b * width : (b + 1) * width]
            order = np.lexsort((np.arange(n), *band.T[::-1]))  # by the band's entries, then by position
            ranked = band[order]
            starts = np.r_[True, (ranked[1:] != ranked[:-1]).any(axis=1)]
            group = np.cumsum(starts) - 1
            first = np.flatnonzero(starts)
            rank = np.arange(n) - first[group]  # position within the bucket, in order of addition
            for t in range(self.bucket_cap):  # each item meets the bucket's first bucket_cap earlier items
                later = rank > t
                a, c = order[later], order[first[group[later]] + t]
                keep = (sigs[a] == sigs[c]).sum(axis=1) >= need
                accepted.append(np.stack([a[keep], c[keep]], axis=1).astype(np.int32))
        return np.concatenate(accepted)

    def clusters(self) -> list[list[int]]:
        """Clusters of two or more items, each in order of addition, ordered by their first item."""
        if not self._items:
            return []
        labels = connected_components(len(self._items), self._links())
        groups: dict[int, list[int]] = {}
        for label, item in zip(labels.tolist(), self._items):
            groups.setdefault(label, []).append(item)
        return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def connected_components(n: int, links: np.ndarray) -> np.ndarray:
    """``[n]`` the smallest node of each node's component, for undirected ``[L, 2]`` links: roots hook
    onto the smaller root across each link, then every node jumps to its root, until no link joins two."""
    labels = np.arange(n)
    a, b = links[:, 0].astype(np.int64), links[:, 1].astype(np.int64)
    while True:
        la, lb = labels[a], labels[b]
        joining = la != lb
        if not joining.any():
            return labels
        low = np.minimum(la[joining], lb[joining])
        np.minimum.at(labels, la[joining], low)
        np.minimum.at(labels, lb[joining], low)
        while True:  # pointer jumping: labels only ever point to smaller nodes, so this ends at roots
            jumped = labels[labels]
            if (jumped == labels).all():
                break
            labels = jumped
