"""``inspect``: every check on one preference file, and ``--write-clean``.

Rows are read as a stream (:func:`preftune.data.io.read_rows`) and parsed one at a time by the
training parser (:func:`preftune.data.formats.iter_examples` with ``skip_bad_rows``, so file-level
rules such as one format per file apply exactly as in training); each pair goes through the text
checks (which keep hashes, MinHash signatures and lengths, not the text), and in chunks through the
token checks (with a tokenizer) and the model scorer (with a model). Nothing is modified;
:func:`write_clean` writes a filtered copy.

Removal reasons, in priority order (a row removed for several is logged under the first):
``bad_row`` (training would reject it; always removed), ``identical`` (chosen == rejected: training
drops it), ``conflict``, ``duplicate`` (an exact repeat of an earlier row), ``empty_completion``,
``near_duplicate``, ``truncated_identical`` (dropped by training anyway), ``contaminated`` (its
prompt overlaps the eval prompts), ``likely_flip``. ``--write-clean`` drops the first four by
default.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.formats import LoadedData, PreferencePair, RowParser, iter_examples, parse_rows
from preftune.data.io import RawRow, read_rows
from preftune.data.tokenize import Budgets
from preftune.doctor.contamination import Contamination
from preftune.doctor.flips import estimate_flips
from preftune.doctor.images import ImageChecks, unreadable_rows
from preftune.doctor.scan import PlainChat, TextChecks, format_of

REASONS = (
    "bad_row",
    "identical",
    "conflict",
    "duplicate",
    "empty_completion",
    "near_duplicate",
    "truncated_identical",
    "contaminated",
    "likely_flip",
)
DEFAULT_DROP = ("bad_row", "identical", "conflict", "duplicate")
CHUNK = 256


@dataclass
class InspectOptions:
    """What to check. Token checks need ``tokenizer`` (or ``model``); flips need ``model``."""

    tokenizer: str | None = None
    budgets: Budgets = field(default_factory=Budgets)
    batch_size: int = 8
    layouts: tuple[str, ...] = ("padded", "packed", "prefix_shared")
    pack_length: int | None = None
    seed: int = 0
    max_padding_batches: int = 16
    near_threshold: float = 0.8
    eval_file: str | None = None
    ngram: int = 8
    contamination_threshold: float = 0.5
    model: str | None = None
    reference: str | None = None
    beta: float = 0.1
    flip_threshold: float | None = None


@dataclass
class Inspection:
    """The findings (``summary``, written as inspect.json) and the arrays the plots draw."""

    summary: dict[str, Any]
    char_lengths: np.ndarray
    token_lengths: np.ndarray | None = None
    margins: np.ndarray | None = None

    def rows_for(self, reason: str) -> dict[int, str]:
        """row -> why, for the rows a removal reason names (ValueError when its check did not run)."""
        s = self.summary
        need = {
            "truncated_identical": ("tokens", "--tokenizer"),
            "contaminated": ("contamination", "--eval"),
            "likely_flip": ("flips", "--model"),
        }
        if reason not in REASONS:
            raise ValueError(f"unknown removal reason {reason!r}; choose from {', '.join(REASONS)}")
        if reason in need and need[reason][0] not in s:
            raise ValueError(f"removal reason {reason!r} needs {need[reason][1]}")
        t = s["text"]
        if reason == "bad_row":
            errors = s.get("tokens", {}).get("errors", {"rows": [], "messages": []})
            return dict(
                zip(t["bad_rows"]["rows"] + errors["rows"], t["bad_rows"]["messages"] + errors["messages"])
            )
        if reason in ("identical", "empty_completion"):
            part, what = {
                "identical": (t["chosen_equals_rejected"], "chosen == rejected"),
                "empty_completion": (t["empty_completions"], "empty chosen or rejected"),
            }[reason]
            return dict.fromkeys(part["rows"], what)
        if reason in ("conflict", "duplicate", "near_duplicate"):
            part, what = {
                "conflict": (t["conflicts"], "the same pair with chosen and rejected swapped; group of row"),
                "duplicate": (t["exact_duplicates"]["pairs"], "exact repeat of row"),
                "near_duplicate": (t["near_duplicates"]["pairs"], "near duplicate of row"),
            }[reason]
            return {r: f"{what} {f}" for r, f in zip(part["rows"], part["of"])}
        if reason == "truncated_identical":
            return {
                r: "chosen == rejected after truncation" for r in s["tokens"]["dropped_identical"]["rows"]
            }
        if reason == "contaminated":
            c = s["contamination"]["train_contaminated"]
            return {
                r: f"prompt {s['contamination']['ngram']}-gram overlap with eval {x:.2f}"
                for r, x in zip(c["rows"], c["overlap"])
            }
        f = s["flips"]["flagged"]
        return {r: f"margin {m:+.4g} against the label" for r, m in zip(f["rows"], f["margins"])}

    def removals(self, drop: tuple[str, ...] = DEFAULT_DROP) -> dict[int, tuple[str, str]]:
        """row -> (reason, detail), the first reason in :data:`REASONS` order; bad rows always go
        (training rejects them, and an unparsable line cannot be copied)."""
        reasons = {"bad_row", *drop}
        unknown = reasons - set(REASONS)
        if unknown:
            raise ValueError(
                f"unknown removal reason {sorted(unknown)[0]!r}; choose from {', '.join(REASONS)}"
            )
        out: dict[int, tuple[str, str]] = {}
        for reason in sorted(reasons, key=REASONS.index):
            for row, detail in self.rows_for(reason).items():
                out.setdefault(row, (reason, detail))
        return out


def _eval_prompts(path: str, chat: Any) -> list[tuple[int, str]]:
    """(row, prompt) of the eval file's usable pairs."""
    rows = {}
    loaded = parse_rows(
        (rows.setdefault(RowParser(raw, None).origin, raw.row) and raw for raw in read_rows(path)),
        kind="paired",
        tokenizer=chat,
        skip_bad_rows=True,
    )
    if not loaded.pairs:
        raise ValueError(f"{path}: no usable eval rows")
    return [(rows[p.origin], p.prompt) for p in loaded.pairs]


def _image_inputs(path: str, tokenizer: Any) -> Any:
    """The image inputs of an image-text model at ``path``; None for a text model, or a tokenizer
    directory without a model config."""
    from preftune.model.vision import is_vision_config, load_image_inputs, model_config

    try:
        config = model_config(path)
    except (OSError, ValueError):  # a tokenizer alone
        return None
    return load_image_inputs(path, tokenizer) if is_vision_config(config) else None


@dataclass
class _Checks:
    """The checks of one run: the text checks always, the token checks with a tokenizer, contamination
    with an eval file, and the margins of a scorer with a model. Pairs reach the token checks and the
    scorer in chunks of :data:`CHUNK`."""

    text: TextChecks
    chat: Any  # the tokenizer, or a plain chat template without one
    images: ImageChecks = field(default_factory=ImageChecks)
    tokens: Any = None
    contamination: Contamination | None = None
    scorer: Any = None
    scored_rows: list[int] = field(default_factory=list)
    margins: list[np.ndarray] = field(default_factory=list)  # one [chunk] array per scored chunk
    chunk: list[tuple[int, PreferencePair]] = field(default_factory=list)

    @classmethod
    def load(cls, o: InspectOptions) -> _Checks:
        """The scorer (with ``o.model``), the tokenizer, and the checks ``o`` allows."""
        scorer = tokenizer = None
        if o.model:
            from preftune.doctor.scoring import PairScorer

            scorer = PairScorer.load(o.model, reference=o.reference, beta=o.beta, budgets=o.budgets)
            tokenizer = scorer.tokenizer
        if o.tokenizer:
            from preftune.model.load import load_tokenizer

            tokenizer = load_tokenizer(o.tokenizer)
        chat = tokenizer if tokenizer is not None else PlainChat()
        inputs = None
        if tokenizer is not None:  # an image-text model's image inputs: the tokens each image fills
            inputs = scorer.images if scorer is not None else _image_inputs(o.tokenizer, tokenizer)
        checks = cls(TextChecks(near_threshold=o.near_threshold), chat, ImageChecks(inputs), scorer=scorer)
        if tokenizer is not None:
            from preftune.doctor.tokens import TokenChecks

            checks.tokens = TokenChecks(
                tokenizer, o.budgets, o.batch_size, o.layouts, o.pack_length, o.seed, o.max_padding_batches,
                images=inputs,
            )
        if o.eval_file:
            checks.contamination = Contamination(
                _eval_prompts(o.eval_file, chat), o.ngram, o.contamination_threshold
            )
        return checks

    def add(self, row: int, pair: PreferencePair) -> None:
        """One pair: the text checks keep hashes, signatures and lengths, never the text."""
        self.text.add(row, pair)
        self.images.add(row, pair)
        if self.contamination is not None:
            self.contamination.add(row, pair.prompt)
        if self.tokens is not None or self.scorer is not None:
            self.chunk.append((row, pair))
            if len(self.chunk) >= CHUNK:
                self.flush()

    def flush(self) -> None:
        """The chunk through the token checks, then its pairs that pass them through the scorer."""
        rows, pairs = [r for r, _ in self.chunk], [p for _, p in self.chunk]
        if self.tokens is not None:
            ok = set(self.tokens.add(rows, pairs))
            rows, pairs = [r for r in rows if r in ok], [p for r, p in zip(rows, pairs) if r in ok]
        if self.scorer is not None and pairs:
            self.scored_rows.extend(rows)
            self.margins.append(self.scorer.margins(pairs))
        self.chunk.clear()


class _RowPlacer:
    """Gives each parsed pair the row it came from: the raw rows read before a pair's origin gave no
    pair, and are counted as bad rows with the parser's skip messages (one per skipped row, in row
    order)."""

    def __init__(self, path: str | Path, text: TextChecks):
        self.path, self.text = path, text
        self.seen: deque[tuple[int, str, str]] = deque()  # (row, origin, format) read and not yet placed
        self.skips = LoadedData()  # one message per row that gave no pair, in row order
        self.placed_errors = 0

    def rows(self) -> Iterator[RawRow]:
        """The raw rows of the file, each remembered until placed."""
        for raw in read_rows(self.path):
            self.seen.append((raw.row, RowParser(raw, None).origin, format_of(raw.fields)))
            yield raw

    def place(self, until: str | None) -> int | None:
        """Count the rows read before ``until`` (the origin of the pair just parsed) as bad rows; its
        row."""
        while self.seen:
            row, origin, fmt = self.seen.popleft()
            self.text.formats[fmt] += 1
            if origin == until:
                return row
            skipped = self.skips.skipped
            message = skipped[self.placed_errors] if self.placed_errors < len(skipped) else None
            self.placed_errors += message is not None
            self.text.add_bad(row, message or f"{origin}: skipped by the parser")
        return None


def inspect_data(path: str | Path, options: InspectOptions | None = None) -> Inspection:
    """Run every check that ``options`` allows on one preference file (see the module docstring)."""
    o = options or InspectOptions()
    start = time.perf_counter()
    checks = _Checks.load(o)
    text = checks.text
    placer = _RowPlacer(path, text)
    # one pair at a time: the text checks keep hashes, signatures and lengths, never the text
    pairs = iter_examples(
        placer.rows(), kind="paired", tokenizer=checks.chat, skip_bad_rows=True, skips=placer.skips
    )
    for pair in pairs:
        checks.add(placer.place(pair.origin), pair)
    placer.place(None)
    text.bad_reasons = dict(placer.skips.skip_reasons)
    if checks.chunk:
        checks.flush()
    if not text.rows and not text.bad:
        raise ValueError(f"{path}: no rows")
    inspection = _inspection(path, o, checks)
    inspection.summary["seconds"] = round(time.perf_counter() - start, 2)
    return inspection


def _inspection(path: str | Path, o: InspectOptions, checks: _Checks) -> Inspection:
    """The summaries of the checks that ran, and the arrays the plots draw."""
    text, tokens, contamination, scorer = checks.text, checks.tokens, checks.contamination, checks.scorer
    summary: dict[str, Any] = {"data": str(path), "text": text.summary()}
    unreadable = unreadable_rows(summary["text"]["bad_rows"])
    if checks.images.sizes or unreadable:
        summary["images"] = checks.images.summary(unreadable)
        if tokens is not None and tokens.images is not None:
            summary["images"]["too_long"] = {"rows": tokens.images_cut}
    inspection = Inspection(summary, text.lengths)
    if tokens is not None:
        summary["tokens"] = tokens.summary()
        summary["tokenizer"] = o.tokenizer or o.model
        inspection.token_lengths = np.array(tokens.full, dtype=np.int64).reshape(-1, 3)
    if contamination is not None:
        summary["contamination"] = {"eval_file": o.eval_file, **contamination.summary()}
        summary["contamination"]["train_contaminated"]["share"] = len(contamination.train_rows) / max(
            len(text.rows), 1
        )
    if scorer is not None:
        m = np.concatenate(checks.margins) if checks.margins else np.zeros(0)
        summary["flips"] = {
            "scorer": scorer.description, **estimate_flips(checks.scored_rows, m, o.flip_threshold)
        }
        inspection.margins = m
    return inspection


def _open_out(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def write_clean(
    path: str | Path, out: str | Path, inspection: Inspection, drop: tuple[str, ...] = DEFAULT_DROP
) -> dict[str, Any]:
    """Copy the rows of ``path`` not removed to ``out`` (JSONL, ``.gz`` for gzip), unchanged; write
    ``<out>.removed.jsonl`` with one ``{"row", "reason", "detail"}`` line per removed row."""
    out = Path(out)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"--write-clean {out}: the clean copy is written as .jsonl or .jsonl.gz")
    if out.resolve() == Path(path).resolve():
        raise ValueError(f"--write-clean {out}: refusing to overwrite the input")
    removal = inspection.removals(drop)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name.removesuffix(".gz").removesuffix(".jsonl") + ".removed.jsonl")
    kept = 0
    with _open_out(out) as f, open(log_path, "w", encoding="utf-8") as log:
        for raw in read_rows(path):
            if raw.row not in removal:
                f.write(json.dumps(raw.fields, ensure_ascii=False, default=str) + "\n")
                kept += 1
            else:
                reason, detail = removal[raw.row]
                log.write(
                    json.dumps({"row": raw.row, "reason": reason, "detail": detail}, ensure_ascii=False)
                    + "\n"
                )
    counts = dict.fromkeys(sorted({"bad_row", *drop}, key=REASONS.index), 0)
    for reason, _ in removal.values():
        counts[reason] += 1
    return {"out": str(out), "log": str(log_path), "kept": kept, "removed": len(removal), "by_reason": counts}
