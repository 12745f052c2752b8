"""Files -> tokenized pairs on disk: streamed, tokenized in batches, stored compactly, cached.

Rows are read one at a time (:mod:`preftune.data.io`), parsed and validated (:func:`iter_examples`:
file, row and field in every error; ``skip_bad_rows`` counts), and tokenized :data:`CHUNK_ROWS` at a
time with the tokenizer's batch API (a fast tokenizer spreads a batch over every core); each chunk's
token ids go to a :class:`~preftune.data.store.PairStoreWriter` and its text is dropped. The store
is an Arrow file, memory-mapped when read, so memory does not grow with the number of pairs.

Cache: the store and its counters are kept under ``cache_dir/<key>/`` where the key hashes the
files' bytes, the tokenizer (its vocabulary, merges, special tokens and chat template), the data
kind, the budgets and ``skip_bad_rows``. An entry is written to a temporary directory and renamed
(never half-written), holds the sha256 of its store, and is read only when that checksum and its
identity match; otherwise it is rebuilt. A second run, a resume, or another process of the same run
(which waits for the first to write it, see :func:`preftune.engine.setup.load_data`) starts from it.
Data with images is not cached (a row names its image files, whose bytes are read when parsed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.formats import LoadedData, iter_examples, no_usable_rows
from preftune.data.images import ImageInputs
from preftune.data.io import DataError, read_rows
from preftune.data.sources import Source, as_source, hub_fingerprint
from preftune.data.store import PairStore, PairStoreWriter
from preftune.data.tokenize import Budgets, PairTokenizer, TokenizedData

logger = logging.getLogger("preftune")

CACHE_VERSION = 1  # bump when the store's layout or the tokenization changes
CHUNK_ROWS = 2048  # rows tokenized per call of the tokenizer's batch API
STORE_FILE, META_FILE = "pairs.arrow", "meta.json"
_COUNTERS = ("dropped_identical", "truncated", "dropped_untrained", "dropped_equal", "dropped_images",
             "empty_completions", "first_dropped")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/preftune/tokenized`` (``~/.cache`` when unset), beside the reference cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "preftune", "tokenized")


@dataclass
class TokenizedFiles:
    """The tokenized pairs of some files (``data.pairs`` a :class:`PairStore`) and the rows skipped."""

    data: TokenizedData
    skipped: list[str] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    cached: bool = False  # read from the cache rather than tokenized now


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a dataset directory's files (names and bytes, in order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def source_digest(item: str | Path | Source) -> str:
    """:func:`file_digest` of a file or directory (with a repository's split and config); a hub
    dataset's revision hash (:func:`~preftune.data.sources.hub_fingerprint`)."""
    source = as_source(item)
    base = (hub_fingerprint(source, DataError) if not Path(source.path).exists() and source.is_repository()
            else file_digest(source.path))
    if source.split is None and source.config is None:
        return base
    return hashlib.sha256(f"{base}|{source.split}|{source.config}".encode()).hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the fast tokenizer's whole definition (or a slow one's
    vocabulary), its class, special tokens, BOS/EOS settings and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = (type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                tokenizer.eos_token_id, tokenizer.pad_token_id,
                sorted(map(str, tokenizer.all_special_tokens)),
                getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
    h.update(repr(settings).encode())
    return h.hexdigest()


def tokenize_files(files: Sequence[str], tokenizer: Any, budgets: Budgets, *, kind: str = "paired",
                   skip_bad_rows: bool = False, purpose: str | None = None, images: ImageInputs | None = None,
                   cache_dir: str | None = None) -> TokenizedFiles:
    """Read, validate and tokenize ``files`` into a store (see the module docstring); from the cache
    when an entry matches. No pair left is a DataError counting what was skipped and dropped."""
    if images is not None:  # image bytes are read as rows parse: not keyed by the data files alone
        return _build(files, tokenizer, budgets, kind, skip_bad_rows, purpose, images, Path(tempfile.mkdtemp(
            prefix="preftune-tokenized-")))
    identity = {"version": CACHE_VERSION, "kind": kind, "files": [source_digest(f) for f in files],
                "tokenizer": tokenizer_identity(tokenizer),
                "budgets": [budgets.max_length, budgets.max_prompt_length, budgets.max_completion_length],
                "skip_bad_rows": skip_bad_rows}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir or default_cache_dir())
    entry = root / key
    found, why = _read_entry(entry, identity)
    if found is not None:
        logger.info("data: %d tokenized pairs from the cache (%s)", len(found.data.pairs), entry)
        return found
    if entry.exists():
        logger.info("data: the cached entry %s is not used (%s); tokenizing again", entry, why)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(root)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    except OSError as e:  # a read-only cache: tokenize into a temporary directory, one line says so
        logger.info("data: cannot write the cache at %s (%s); tokenizing into a temporary directory", root, e)
        return _build(files, tokenizer, budgets, kind, skip_bad_rows, purpose, None,
                      Path(tempfile.mkdtemp(prefix="preftune-tokenized-")))
    try:
        built = _build(files, tokenizer, budgets, kind, skip_bad_rows, purpose, None, work, identity)
        shutil.rmtree(entry, ignore_errors=True)  # a stale or corrupt entry
        try:
            os.replace(work, entry)
        except OSError:  # another process wrote the same entry meanwhile: use it if it is whole
            found, why = _read_entry(entry, identity)
            if found is None:
                raise
            shutil.rmtree(work, ignore_errors=True)
            return found
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    pairs = built.data.pairs
    built.data.pairs = PairStore(entry / STORE_FILE, pairs.fingerprint())  # the same file, at its new path
    return built


def _remove_stale_builds(root: Path, max_idle_s: float = 6 * 3600.0) -> None:
    """Temporary directories of builds killed mid-way: nothing in them written for ``max_idle_s`` (a
    live build writes its store continuously)."""
    for work in root.glob(".*"):
        try:
            newest = max([work.stat().st_mtime, *(f.stat().st_mtime for f in work.iterdir())])
            if work.is_dir() and time.time() - newest > max_idle_s:
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile


def _read_entry(entry: Path, identity: dict[str, Any]) -> tuple[TokenizedFiles | None, str]:
    """The cached entry, or (None, why not): absent, of another identity, partial or corrupt."""
    meta_file, store_file = entry / META_FILE, entry / STORE_FILE
    if not meta_file.is_file() or not store_file.is_file():
        return None, "absent or partial"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "its metadata cannot be read"
    if meta.get("identity") != identity:
        return None, "written for other files, tokenizer or settings"
    with open(store_file, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != meta.get("checksum"):
            return None, "corrupt: its store does not match its checksum"
    data = TokenizedData(PairStore(store_file, meta["fingerprint"]), **meta["counters"])
    return TokenizedFiles(data, meta["skipped"], meta["skip_reasons"], cached=True), ""


def _build(files: Sequence[str], tokenizer: Any, budgets: Budgets, kind: str, skip_bad_rows: bool,
           purpose: str | None, images: ImageInputs | None, work: Path,
           identity: dict[str, Any] | None = None) -> TokenizedFiles:
    """Tokenize ``files`` into ``work/pairs.arrow`` (and ``work/meta.json`` with ``identity``)."""
    pair_tokenizer = PairTokenizer(tokenizer, budgets, images)
    skips = LoadedData()
    counters = TokenizedData()
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)
    writer = PairStoreWriter(work / STORE_FILE, vocab_size)
    rows = _rows(files)
    examples = iter_examples(rows, kind=kind, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows,
                             purpose=purpose, skips=skips)
    started, parsed = time.perf_counter(), 0
    try:
        for chunk in _tokenized_chunks(pair_tokenizer, kind, chunks_of(examples, CHUNK_ROWS)):
            counters.merge(chunk)
            for pair in chunk.pairs:
                writer.add(pair)
            parsed += len(chunk.pairs)
            if parsed >= 100_000 and parsed % 100_000 < CHUNK_ROWS:
                logger.info("data: %s pairs tokenized (%.0f/s)", f"{parsed:,}",
                            parsed / (time.perf_counter() - started))
        if writer.count == 0:
            first = skips.skipped[0] if skips.skipped else counters.first_dropped
            raise no_usable_rows(", ".join(map(str, files)), skips.skip_reasons, counters.drops(), first)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    meta = {"identity": identity, "fingerprint": writer.fingerprint, "pairs": writer.count,
            "tokens": writer.tokens, "counters": {k: getattr(counters, k) for k in _COUNTERS},
            "skipped": skips.skipped, "skip_reasons": skips.skip_reasons}
    with open(work / STORE_FILE, "rb") as f:
        meta["checksum"] = hashlib.file_digest(f, "sha256").hexdigest()
    (work / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    data = TokenizedData(PairStore(work / STORE_FILE, writer.fingerprint), **meta["counters"])
    return TokenizedFiles(data, skips.skipped, skips.skip_reasons)


def _rows(files: Sequence[str | Source]) -> Iterator[Any]:
    for path in files:
        yield from read_rows(path)


def chunks_of(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one shorter), read from ``items`` as needed."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenized_chunks(pair_tokenizer: PairTokenizer, kind: str,
                      chunks: Iterable[list[Any]]) -> Iterator[TokenizedData]:
    """Each chunk of examples tokenized as the whole list would be. Unpaired (KTO) examples borrow
    the next example's completion, across chunk ends and, for the last one, from the first."""
    if kind == "paired":
        yield from map(pair_tokenizer.tokenize, chunks)
    elif kind == "sft":
        yield from map(pair_tokenizer.tokenize_sft, chunks)
    else:
        held, first = None, None
        for chunk in chunks:
            if held is not None:
                yield pair_tokenizer.tokenize_unpaired(held, following=chunk[0].completion)
            first = first if first is not None else chunk[0].completion
            held = chunk
        if held is not None:
            yield pair_tokenizer.tokenize_unpaired(held, following=first)
