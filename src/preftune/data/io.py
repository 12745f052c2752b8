"""Read raw rows from preference files: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` (each
optionally ``.gz``) and local ``datasets`` directories (``save_to_disk`` output).

Rows come out as ``RawRow(source, row, fields)`` with a 1-based row number (the line number for
``.jsonl``, the data row for ``.csv``, the list index for ``.json``) so that every later error
can say ``file: row N: field 'x': ...``.

Faults: text must be UTF-8 (a leading BOM is dropped); a row holding an undecodable byte becomes
an :class:`Unparsable` naming the field it is in (or the whole line), so it is reported or skipped
like any bad row; so does text that UTF-8 cannot encode (a lone surrogate, which a JSON escape
can spell). Files are read as a stream (a ``.gz`` decompressed as it is read, parquet a batch at a
time), so memory does not grow with the file; only ``.json`` is parsed whole. A ``.gz`` file that
is truncated, corrupt or not gzip at all is one :class:`DataError` naming the file, what is wrong
and the last good row, raised where the fault is met: the run stops there, having trained on and
cached nothing.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from preftune.data.sources import Source, as_source, read_repository

SKIP_HINT = "to skip such rows, set skip_bad_rows: true (--skip_bad_rows true)"


class DataError(ValueError):
    """A bad input; the message is one line naming file, row and field.

    ``message`` is the text after the location; ``reason`` groups like errors in counts (the
    message without the offending value); both prefixed with the field in ``reason_key``.
    """

    def __init__(self, source: str, row: int | None, field: str | None, message: str,
                 reason: str | None = None):
        where = source if row is None else f"{source}: row {row}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")
        self.source, self.row, self.field = source, row, field
        self.message, self.reason = message, reason or message

    @property
    def reason_key(self) -> str:
        return self.reason if self.field is None else f"field {self.field!r}: {self.reason}"

    def with_skip_hint(self) -> DataError:
        """The same error, its message ending with how to skip such rows."""
        return DataError(self.source, self.row, self.field, f"{self.message}; {SKIP_HINT}", self.reason)


@dataclass(frozen=True)
class Unparsable:
    """Stands in for a row that could not be read; the format layer reports (or skips) it."""

    message: str
    field: str | None = None  # the field holding the problem, when known


@dataclass(frozen=True)
class RawRow:
    source: str
    row: int
    fields: Any  # a dict for well-formed rows; anything else is reported by the format layer


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_rows(path: str | Path | Source) -> Iterator[RawRow]:
    """Yield the rows of one file, saved dataset or dataset repository (a hub id or a directory laid
    out as one: :mod:`preftune.data.sources`), in order."""
    source = as_source(path)
    if source.is_repository():
        yield from read_repository(source, RawRow, DataError)
        return
    split, name, path = source.split, source.config, Path(source.path)
    source = str(path)
    if not path.exists():
        raise DataError(source, None, None, "no such file or directory")
    if path.is_dir():
        yield from _read_dataset_dir(path, split)
        return
    if split is not None or name is not None:  # else a file would be read whole, whatever split was asked
        raise DataError(source, None, None, "a split or dataset_config names part of a dataset repository "
                        "(a hub id or a directory of data files) or a saved dataset, not of one file")
    kind = _base_suffix(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if kind not in readers:
        raise DataError(source, None, None, f"unsupported file type {kind!r}; use {', '.join(readers)}")
    yield from readers[kind](path)


# ---- compressed files ----------------------------------------------------------------------------

PIECE = 1 << 16  # bytes read (and fed to the decompressor) at a time


class _GzipFault(Exception):
    """What is wrong with a gzip stream, raised where the fault is met (after the data before it)."""


def _zlib_fault(error: zlib.error) -> _GzipFault:
    if "incorrect data check" in str(error) or "incorrect length check" in str(error):
        return _GzipFault("corrupt compressed file (its checksum does not match: some bytes are damaged)")
    return _GzipFault(f"corrupt compressed file ({str(error).split(': ', 1)[-1]})")


def _gunzip(file: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of every gzip member of ``file``, piece by piece; at a fault, the
    data before it is yielded, then :class:`_GzipFault` says what is wrong."""
    pending, produced = file.read(PIECE), False
    while True:
        if len(pending) < 2:
            pending += file.read(PIECE)
        if not pending:
            return
        if pending[:2] != b"\x1f\x8b":
            if produced:  # zero padding after the last member is allowed
                while pending:
                    if pending.strip(b"\0"):
                        raise _GzipFault("corrupt compressed file (bytes after the end of the gzip data)")
                    pending = file.read(PIECE)
                return
            raise _GzipFault("not a gzip file (it does not start with the gzip magic bytes)")
        d = zlib.decompressobj(wbits=31)
        while not d.eof:
            if not pending:
                pending = file.read(PIECE)
                if not pending:
                    tail = d.flush()
                    if tail:
                        yield tail
                    raise _GzipFault("truncated compressed file "
                                     "(it ends before the gzip end-of-stream marker)")
            chunk, pending, saved = pending, b"", d.copy()
            try:
                out = d.decompress(chunk)
            except zlib.error:  # again byte by byte, to yield the output before the fault
                d, out = saved, b""
                for i in range(len(chunk)):
                    try:
                        out += d.decompress(chunk[i : i + 1])
                    except zlib.error as e:
                        if out:
                            yield out
                        raise _zlib_fault(e) from None
                    if d.eof:
                        pending = chunk[i + 1 :]
                        break
            if out:
                produced = True
                yield out
            if d.eof and not pending:  # the bytes after the member (the byte-wise path set them itself)
                pending = d.unused_data
        # the next member (or padding) starts at ``pending``


def _open_lines(path: Path) -> Iterator[bytes]:
    """The file's lines (newline kept, the last one may lack it), decompressed as they are read when
    it ends in ``.gz``; a compression fault is raised as :class:`_GzipFault` after the lines before it."""
    with open(path, "rb") as f:
        if path.suffix != ".gz":
            yield from f
            return
        rest = b""
        for piece in _gunzip(f):
            lines = (rest + piece).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest


def _fault(path: Path, problem: str, last_good_row: int) -> DataError:
    """The one error of a compressed file with a fault: what is wrong and the last good row."""
    where = f"the last good row is row {last_good_row}" if last_good_row else "no row could be read"
    if "checksum" in problem:  # the data came out whole but wrong somewhere: no row is known to be good
        where = f"{last_good_row} rows were decompressed, but any of them may be damaged"
    return DataError(str(path), None, None, f"{problem}; {where}")


def _read_bytes(path: Path) -> bytes:
    """The whole file, decompressed when it ends in ``.gz`` (formats parsed whole: ``.json``)."""
    try:
        return b"".join(_open_lines(path))
    except _GzipFault as e:
        raise _fault(path, str(e), 0) from None


# ---- decoding ------------------------------------------------------------------------------------


def _bad_byte(text: str) -> int | None:
    """The first byte that ``surrogateescape`` decoding kept as a lone surrogate, or None."""
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            return ord(ch) - 0xDC00
    return None


def _first_in(value: Any, find: Callable[[str], Any]) -> Any:
    """The first non-None ``find(text)`` over the strings of a parsed value (dict keys and values,
    list items, nested), or None."""
    if isinstance(value, str):
        return find(value)
    items: Iterable[Any] = ()
    if isinstance(value, dict):
        items = (x for kv in value.items() for x in kv)
    elif isinstance(value, list):
        items = value
    return next((x for x in (_first_in(v, find) for v in items) if x is not None), None)


def _first_field_with(fields: Any, find: Callable[[str], Any]) -> tuple[str | None, Any] | None:
    """(the field, what ``find`` found) of the first field of a row holding it; field None for a row
    that is not an object."""
    keyed = fields.items() if isinstance(fields, dict) else [(None, fields)]
    for key, value in keyed:
        found = _first_in(value, find)
        if found is None and key is not None:
            found = _first_in(key, find)
        if found is not None:
            return (None if key is None else str(key)), found
    return None


def _undecodable(fields: Any) -> Unparsable | None:
    """An Unparsable naming the field of the first undecodable byte in a parsed row, or None."""
    hit = _first_field_with(fields, _bad_byte)
    if hit is None:
        return None
    return Unparsable(f"not valid UTF-8 (byte 0x{hit[1]:02x}): save the file as UTF-8", hit[0])


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(text: str) -> str | None:
    found = _SURROGATE.search(text)
    return found.group() if found else None


def _unencodable(fields: Any) -> Unparsable | None:
    """An Unparsable naming the field of the first lone surrogate in a row of valid UTF-8, or None.
    JSON can spell one (``"\\ud800"``, common in scraped text); no tokenizer can encode it."""
    hit = _first_field_with(fields, _lone_surrogate)
    if hit is None:
        return None
    code = ord(hit[1])
    return Unparsable(f"holds U+{code:04X}, a lone surrogate that UTF-8 cannot encode "
                      f"(a '\\u{code:04x}' escape without its pair?); fix or drop the text", hit[0])


def _checked(fields: Any, bad_bytes: bool) -> Any:
    """``fields``, or an Unparsable for undecodable bytes (``bad_bytes``) or unencodable text in it."""
    return (_undecodable(fields) if bad_bytes else None) or _unencodable(fields) or fields


def _decode(data: bytes) -> tuple[str, bool]:
    """UTF-8 text (BOM dropped) and whether it held undecodable bytes (kept as lone surrogates)."""
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", "surrogateescape"), True


def _jsonl_row(line: bytes) -> Any:
    """One parsed line, or an Unparsable saying why not."""
    text, bad = _decode(line)
    try:
        fields: Any = json.loads(text)
    except json.JSONDecodeError as e:
        if bad:
            byte, column = _bad_byte(text), next(i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff")
            return Unparsable(f"not valid UTF-8 (byte 0x{byte:02x} at character {column + 1} of the line): "
                              "a binary file, or text in another encoding")
        return Unparsable(f"unparsable JSON line ({e.msg})")
    return _checked(fields, bad)


# ---- readers -------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    """Line by line, as the file is read (and decompressed): nothing but the current line in memory."""
    last_good = 0
    try:
        for lineno, line in enumerate(_open_lines(path), start=1):
            if line.strip():
                yield RawRow(str(path), lineno, _jsonl_row(line))
                last_good = lineno
    except _GzipFault as e:
        raise _fault(path, str(e), last_good) from None


def _read_json(path: Path) -> Iterator[RawRow]:
    text, bad = _decode(_read_bytes(path))  # parsed whole: no row before a fault
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        also = " (the file also holds bytes that are not UTF-8)" if bad else ""
        raise DataError(str(path), None, None,
                        f"unparsable JSON at line {e.lineno} ({e.msg}){also}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), None, None, "expected a JSON list of rows (or {'data': [...]})")
    for i, fields in enumerate(data, start=1):
        yield RawRow(str(path), i, _checked(fields, bad))


def _read_csv(path: Path) -> Iterator[RawRow]:
    """Record by record, as the file is read (and decompressed)."""
    rows = 0
    lines = (line.decode("utf-8", "surrogateescape") for line in _open_lines(path))
    try:
        first = next(lines, "")
        reader = csv.DictReader(itertools.chain([first.removeprefix("\ufeff")], lines))
        for i, fields in enumerate(reader, start=1):
            problem = Unparsable("more values than header columns") if None in fields else None
            parsed = problem or _checked({k: _csv_value(v) for k, v in fields.items()}, True)
            yield RawRow(str(path), i, parsed)
            rows = i
    except _GzipFault as e:
        raise _fault(path, str(e), rows) from None


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

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # a batch of rows at a time
        for fields in batch.to_pylist():
            i += 1
            yield RawRow(str(path), i, fields)


def _read_dataset_dir(path: Path, split: str | None = None) -> Iterator[RawRow]:
    """A saved dataset's rows; of a saved DatasetDict, its ``split`` (default ``train``)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:  # a directory that save_to_disk did not write
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(str(path), None, None, f"a directory, but not one written by datasets' save_to_disk "
                        f"({first}); give a data file or a saved dataset") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(str(path), None, None, f"DatasetDict without a {split!r} split: {list(ds)}")
        ds = ds[split]
    # decode(False): an Image column stays {"bytes", "path"} (data/images.py), not PIL images
    for i, fields in enumerate(ds.to_iterable_dataset().decode(False), start=1):
        yield RawRow(str(path), i, fields)
