"""Near duplicates found from the signatures alone (by sorting each band) equal the streaming LSH
definition: each item meets, in every band, the first ``bucket_cap`` earlier items of its bucket."""

from __future__ import annotations

import numpy as np
import pytest

from preftune.doctor.text import NearDuplicates


def streaming_clusters(items, sigs, threshold, bands=16, cap=4):
    """The definition, item by item: buckets of exact band values, at most ``cap`` items kept each."""
    parent = list(range(len(items)))

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    buckets: dict[tuple, list[int]] = {}
    width = sigs.shape[1] // bands
    for k, sig in enumerate(sigs):
        keys = [(b, *sig[b * width : (b + 1) * width].tolist()) for b in range(bands)]
        for c in sorted({c for key in keys for c in buckets.get(key, ())}):
            if (sigs[c] == sig).sum() >= threshold * len(sig):
                parent[find(k)] = find(c)
        for key in keys:
            bucket = buckets.setdefault(key, [])
            if len(bucket) < cap:
                bucket.append(k)
    groups: dict[int, list[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault(find(k), []).append(item)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@pytest.mark.parametrize("seed", range(12))
def test_clusters_equal_the_streaming_definition(seed):
    rng = np.random.default_rng(seed)
    # few values: full buckets, the cap matters
    n, values = int(rng.integers(2, 300)), (40 if seed % 2 else 2**32)
    base = rng.integers(0, values, size=(max(1, n // 6), 64), dtype=np.uint64).astype(np.uint32)
    sigs = base[rng.integers(0, len(base), n)]
    changed = rng.random(sigs.shape) < rng.uniform(0.0, 0.4)
    sigs[changed] = rng.integers(0, values, size=int(changed.sum()), dtype=np.uint64).astype(np.uint32)
    threshold = float(rng.choice([0.5, 0.8, 0.9]))
    items = rng.permutation(10 * n)[:n].tolist()
    near = NearDuplicates(threshold)
    for item, sig in zip(items, sigs):
        near.add(item, sig)
    assert near.clusters() == streaming_clusters(items, sigs, threshold)


def test_planted_near_duplicates_cluster():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, size=64, dtype=np.uint64).astype(np.uint32)
    b = a.copy()
    b[:6] += 1  # 58 of 64 entries equal: estimated Jaccard 0.91
    other = rng.integers(0, 2**32, size=64, dtype=np.uint64).astype(np.uint32)
    near = NearDuplicates(0.8)
    for item, sig in ((10, a), (11, other), (12, b)):
        near.add(item, sig)
    assert near.clusters() == [[10, 12]]


def test_no_items_no_clusters():
    assert NearDuplicates().clusters() == []


def test_connected_components_of_a_chain_and_a_star():
    from preftune.doctor.text import connected_components

    chain = np.array([[k + 1, k] for k in range(98, -1, -1)] + [[150, 120], [121, 150]])
    labels = connected_components(200, chain)
    assert (labels[:100] == 0).all() and labels[120] == labels[121] == labels[150] == 120
    assert (labels[200 - 40 :] == np.arange(160, 200)).all()  # untouched nodes are their own component
    assert (connected_components(5, np.zeros((0, 2), dtype=np.int32)) == np.arange(5)).all()
