"""Tokenized pairs on disk: flat integer arrays with per-pair offsets in an Arrow file, memory-mapped.

A dataset of ``n`` pairs costs, in memory, the pages of the file the batches being built touch
(the kernel's page cache holds the rest, and drops it under pressure), not a Python object per
token. Each record batch of :data:`CHUNK` pairs holds the columns

    prompt, chosen, rejected   list<uint16 | int32>   token ids (uint16 when the vocabulary fits)
    chosen_mask                list<uint8>            trained tokens of ``chosen`` (SFT); [] = all
    image_positions            list<int32>            where the prompt's image features go
    preference, margin         float64
    origin                     string                 "file: row N"
    images                     string                 the prompt's images as JSON ([] without images)

and :class:`PairStore` serves pair ``i`` as a :class:`~preftune.data.tokenize.TokenizedPair`,
built when asked for (a batch at a time). :class:`PairStoreWriter` appends pairs and writes the
file once, atomically; its ``fingerprint`` hashes exactly what the old in-memory fingerprint did
(ids, labels, masks, images by content), from the arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa

from preftune.data.images import ImageRef
from preftune.data.tokenized import TokenizedPair, fingerprint_of, pair_key

CHUNK = 4096  # pairs per record batch: the writer's buffer, and the reader's unit of lookup


def id_type(vocab_size: int) -> pa.DataType:
    """The smallest Arrow integer type that holds every token id."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.int32()


def _schema(ids: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("prompt", pa.list_(ids)), ("chosen", pa.list_(ids)), ("rejected", pa.list_(ids)),
        ("chosen_mask", pa.list_(pa.uint8())), ("image_positions", pa.list_(pa.int32())),
        ("preference", pa.float64()), ("margin", pa.float64()), ("origin", pa.string()),
        ("images", pa.string()),
    ])


def _images_json(images: Sequence[ImageRef]) -> str:
    """A pair's images as JSON: path, or the encoded bytes as hex, and the digest."""
    if not images:
        return "[]"
    return json.dumps([{"digest": i.digest, "path": i.path,
                        "data": i.data.hex() if i.data is not None else None} for i in images])


def _images_from(text: str) -> tuple[ImageRef, ...]:
    if text == "[]":
        return ()
    return tuple(ImageRef(d["digest"], d["path"], bytes.fromhex(d["data"]) if d["data"] is not None else None)
                 for d in json.loads(text))


class PairStoreWriter:
    """Append pairs, then :meth:`close` writes ``path`` (via a temporary file renamed into place)."""

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.schema = _schema(id_type(vocab_size))
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)
        self.buffer: list[TokenizedPair] = []
        self.count = 0
        self.tokens = 0
        self.hash = hashlib.sha256()

    def add(self, pair: TokenizedPair) -> None:
        self.buffer.append(pair)
        self.hash.update(pair_key(pair))
        self.count += 1
        self.tokens += len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        if len(self.buffer) == CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        b, types = self.buffer, self.schema.types
        columns = [
            pa.array([p.prompt_ids for p in b], types[0]), pa.array([p.chosen_ids for p in b], types[1]),
            pa.array([p.rejected_ids for p in b], types[2]),
            pa.array([list(map(int, p.chosen_mask or ())) for p in b], types[3]),
            pa.array([p.image_positions for p in b], types[4]),
            pa.array([p.preference for p in b], types[5]), pa.array([p.margin for p in b], types[6]),
            pa.array([p.origin for p in b], types[7]),
            pa.array([_images_json(p.images) for p in b], types[8]),
        ]
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.buffer = []

    @property
    def fingerprint(self) -> str:
        """The sha256 of every pair's :func:`pair_key`, in order (equal to ``TokenizedData.fingerprint``)."""
        return self.hash.hexdigest()

    def close(self) -> Path:
        """Write what is buffered and move the file into place."""
        self._flush()
        self.writer.close()
        self.sink.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (a failed load leaves nothing half-written)."""
        try:
            self.writer.close()
            self.sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class _Batch:
    """One record batch as numpy views of its (memory-mapped) buffers."""

    def __init__(self, batch: pa.RecordBatch):
        def lists(name: str) -> tuple[np.ndarray, np.ndarray]:
            column = batch.column(name)
            offsets = column.offsets.to_numpy()
            return offsets, column.values.to_numpy(zero_copy_only=True)

        self.prompt, self.chosen, self.rejected = lists("prompt"), lists("chosen"), lists("rejected")
        self.mask, self.positions = lists("chosen_mask"), lists("image_positions")
        self.preference = batch.column("preference").to_numpy()
        self.margin = batch.column("margin").to_numpy()
        self.origin, self.images = batch.column("origin"), batch.column("images")

    @staticmethod
    def _ids(column: tuple[np.ndarray, np.ndarray], j: int) -> tuple[int, ...]:
        offsets, values = column
        return tuple(values[offsets[j] : offsets[j + 1]].tolist())

    def pair(self, j: int) -> TokenizedPair:
        mask = self._ids(self.mask, j)
        return TokenizedPair(self._ids(self.prompt, j), self._ids(self.chosen, j),
                             self._ids(self.rejected, j),
                             float(self.preference[j]), self.origin[j].as_py(), float(self.margin[j]),
                             tuple(map(bool, mask)) if mask else None, _images_from(self.images[j].as_py()),
                             self._ids(self.positions, j))

    def token_counts(self) -> np.ndarray:
        """``[rows]`` prompt + chosen + rejected tokens of each pair."""
        return sum(np.diff(c[0]) for c in (self.prompt, self.chosen, self.rejected))


class PairStore(Sequence[TokenizedPair]):
    """The pairs of an Arrow file written by :class:`PairStoreWriter`, memory-mapped; a sequence of
    :class:`TokenizedPair` (``store[i]``, slices, iteration, ``+``)."""

    def __init__(self, path: str | Path, fingerprint: str):
        self.path, self._fingerprint = Path(path), fingerprint
        reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
        self._batches = [_Batch(reader.get_batch(i)) for i in range(reader.num_record_batches)]
        self._length = sum(len(b.preference) for b in self._batches)

    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...

    @overload
    def __getitem__(self, i: slice) -> list[TokenizedPair]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._length))]
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(f"pair {i} of {self._length}")
        return self._batches[i // CHUNK].pair(i % CHUNK)

    def __iter__(self) -> Iterator[TokenizedPair]:
        for batch in self._batches:
            for j in range(len(batch.preference)):
                yield batch.pair(j)

    def __add__(self, other: Sequence[TokenizedPair]) -> ConcatPairs:
        return ConcatPairs(self, other)

    def token_counts(self) -> np.ndarray:
        """``[n]`` prompt + chosen + rejected tokens of each pair, from the offsets alone."""
        if not self._batches:
            return np.zeros(0, np.int64)
        return np.concatenate([b.token_counts() for b in self._batches])

    @property
    def nbytes(self) -> int:
        """Bytes of the file (what the page cache may hold of it)."""
        return self.path.stat().st_size


class ConcatPairs(Sequence[TokenizedPair]):
    """Two sequences of pairs back to back (train then eval, for one reference cache)."""

    def __init__(self, first: Sequence[TokenizedPair], second: Sequence[TokenizedPair]):
        self.first, self.second = first, second

    def fingerprint(self) -> str:
        return hashlib.sha256((fingerprint_of(self.first) + fingerprint_of(self.second)).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self.first)
        if i < 0:
            i += len(self)
        return self.first[i] if i < n else self.second[i - n]

    def __iter__(self) -> Iterator[TokenizedPair]:
        yield from self.first
        yield from self.second
