"""Read raw rows from preference files: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` (each
optionally ``.gz``) and local ``datasets`` directories (``save_to_disk`` output).

Rows come out as ``RawRow(source, row, fields)`` with a 1-based row number (the line number for
``.jsonl``, the data row for ``.csv``, the list index for ``.json``) so that every later error
can say ``file: row N: field 'x': ...``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A bad input row; the message is one line naming file, row and field."""

    def __init__(self, source: str, row: int | None, field: str | None, message: str):
        where = source if row is None else f"{source}: row {row}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")
        self.source, self.row, self.field = source, row, field


@dataclass(frozen=True)
class Unparsable:
    """Stands in for a line that could not be parsed; the format layer reports (or skips) it."""

    message: str


@dataclass(frozen=True)
class RawRow:
    source: str
    row: int
    fields: Any  # a dict for well-formed rows; anything else is reported by the format layer


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield the rows of one file or dataset directory, in order."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataError(source, None, None, "no such file or directory")
    if path.is_dir():
        yield from _read_dataset_dir(path)
        return
    kind = _base_suffix(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if kind not in readers:
        raise DataError(source, None, None, f"unsupported file type {kind!r}; use {', '.join(readers)}")
    yield from readers[kind](path)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields: Any = json.loads(line)
            except json.JSONDecodeError as e:
                fields = Unparsable(f"unparsable JSON line ({e.msg})")
            yield RawRow(str(path), lineno, fields)


def _read_json(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(str(path), None, None, f"unparsable JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), None, None, "expected a JSON list of rows (or {'data': [...]})")
    for i, fields in enumerate(data, start=1):
        yield RawRow(str(path), i, fields)


def _read_csv(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for i, fields in enumerate(reader, start=1):
            if None in fields:
                raise DataError(str(path), i, None, "more values than header columns")
            yield RawRow(str(path), i, {k: _csv_value(v) for k, v in fields.items()})


def _csv_value(value: str | None) -> Any:
    """CSV cells are strings; JSON-looking cells (message lists, numbers, booleans) are decoded."""
    if value is None or value == "":
        return None  # an empty cell is a missing value
    stripped = value.strip()
    if stripped[:1] in "[{" or stripped in ("true", "false") or _is_number(stripped):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # optional dependency, only for parquet input

    table = pq.read_table(path)
    for i, fields in enumerate(table.to_pylist(), start=1):
        yield RawRow(str(path), i, fields)


def _read_dataset_dir(path: Path) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(str(path), None, None, f"DatasetDict without a 'train' split: {list(ds)}")
        ds = ds["train"]
    for i, fields in enumerate(ds, start=1):
        yield RawRow(str(path), i, fields)
