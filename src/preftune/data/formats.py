"""Turn raw rows into text pairs. The dataset contract:

* standard:        ``{"prompt": str, "chosen": str, "rejected": str}``
* conversational:  the same keys holding lists of ``{"role", "content"}`` messages, rendered with the
                   tokenizer's chat template (``prompt`` may be omitted: the shared leading messages are
                   the prompt)
* implicit prompt: only ``chosen`` and ``rejected`` strings sharing a prefix (Anthropic HH). The prompt
                   ends after the last ``"\\n\\nAssistant:"`` inside the shared prefix, or at the end of
                   the longest common prefix when there is no such marker.
* unpaired (KTO):  ``{"prompt": str, "completion": str, "label": bool}`` (``label`` may be 1/0)
* optional ``preference`` in [0, 1]: P(chosen beats rejected), default 1; optional ``margin``
  (a number, read by the reward-model loss only).

Rules every row follows:

* An empty completion (``""``, only whitespace, assistant messages with empty content, or nothing
  left after the implicit-prompt split) is data: its text is ``""``, so its tokens are EOS alone.
* A pair whose chosen equals rejected carries no gradient: it is kept here and dropped (and
  counted) by the tokenizer, like a pair that becomes identical after truncation.
* Numbers: a value that is absent (no key, JSON ``null``, an empty CSV cell, a parquet null) takes
  the default; any present value must be a finite number in range: NaN and +-inf (JSON
  ``NaN``/``Infinity``, a ``NaN`` CSV cell, a NaN stored in parquet) are errors naming the field.
* One file holds one format: every row is standard, implicit-prompt or conversational like the
  file's first row, so that all rows are rendered alike.
* The first row decides the file's data kind (pairs: ``chosen``/``rejected``; unpaired:
  ``completion`` + ``label``; SFT: ``messages`` or ``prompt`` + ``completion``); a kind the loss
  cannot use is one error saying which columns it needs, whatever ``skip_bad_rows`` says.

Supervised fine-tuning (``kind="sft"``) accepts, per row:

* ``{"prompt": str, "completion": str}``: the whole completion is trained on;
* ``prompt``/``completion`` as message lists (a string on either side is a user/assistant message):
  rendered with the chat template like the conversational pairs, the whole completion trained on;
* ``{"messages": [...]}``: a whole conversation, trained on the assistant turns only (see
  :meth:`RowParser.sft_messages`);
* any preference row above: its chosen side, trained on as a whole.

Every malformed row raises :class:`DataError` naming file, row and field and ending with how to
skip such rows; with ``skip_bad_rows`` the row is dropped and counted (per reason) instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data.io import DataError, RawRow, read_rows

# split_implicit_prompt is re-exported: the doctor, tests and benchmarks import it here
from preftune.data.rows import (  # noqa: F401
    SFT_KEYS,
    PreferencePair,
    Prompt,
    RowParser,
    SFTExample,
    UnpairedExample,
    _is_messages,
    split_implicit_prompt,
)


@dataclass
class LoadedData:
    """Rows that parsed, and the messages of rows that were skipped, counted per reason
    (``skip_reasons``: reason -> count, in order of first appearance; ``skipped[0]`` is the first)."""

    pairs: list[PreferencePair] = field(default_factory=list)
    unpaired: list[UnpairedExample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sft: list[SFTExample] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def extend(self, other: LoadedData) -> None:
        self.pairs += other.pairs
        self.unpaired += other.unpaired
        self.skipped += other.skipped
        self.sft += other.sft
        for reason, n in other.skip_reasons.items():
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + n


def plural(n: int, word: str) -> str:
    """``plural(1, "row")`` -> ``"1 row"``, ``plural(2, "row")`` -> ``"2 rows"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def count_phrase(counts: dict[str, int]) -> str:
    """``{"a": 2, "b": 1}`` -> ``"2 × a, 1 × b"``."""
    return ", ".join(f"{n} × {reason}" for reason, n in counts.items())


def no_usable_rows(source: str, skip_reasons: dict[str, int], drops: dict[str, int], first: str) -> DataError:
    """The "no usable rows" error: how many rows were left out for each reason, and the first one."""
    parts = []
    if skip_reasons:
        parts.append(f"{plural(sum(skip_reasons.values()), 'bad row')} skipped "
                     f"({count_phrase(skip_reasons)})")
    if drops:
        parts.append(f"{plural(sum(drops.values()), 'pair')} dropped ({count_phrase(drops)})")
    if not parts:
        return DataError(source, None, None, "no usable rows (no rows at all)")
    return DataError(source, None, None, f"no usable rows: {'; '.join(parts)}; first: {first}")


FORMATS = {
    "standard": "standard (texts with a 'prompt')",
    "implicit prompt": "implicit-prompt (chosen/rejected texts without a 'prompt')",
    "conversational": "conversational (lists of {'role', 'content'} messages)",
}


def row_format(fields: dict) -> tuple[str, str] | None:
    """(format, the field that shows it) of a row: a key of :data:`FORMATS`; None when the row has
    no text field to tell by (its own errors say what is missing)."""
    for key in ("messages", "chosen", "rejected", "completion", "prompt"):
        if isinstance(fields.get(key), list):
            return "conversational", key
    if fields.get("messages") is not None:
        return "conversational", "messages"
    if isinstance(fields.get("chosen"), str) or isinstance(fields.get("rejected"), str):
        return ("standard" if fields.get("prompt") is not None else "implicit prompt"), "prompt"
    if isinstance(fields.get("completion"), str):
        return "standard", "completion"
    return None


def data_kind(fields: dict) -> str | None:
    """The kind of data a row holds: "paired", "unpaired", "sft", or None (cannot tell)."""
    present = {k for k, v in fields.items() if v is not None}
    if present & {"chosen", "rejected"}:
        return "paired"
    if {"completion", "label"} <= present:
        return "unpaired"
    if "messages" in present or "completion" in present:
        return "sft"
    return None


NEEDS = {
    "paired": "preference pairs: 'chosen' and 'rejected' (with a 'prompt', or sharing one)",
    "unpaired": "unpaired rows {'prompt', 'completion', 'label'} (a true/false label per completion)",
    "sft": SFT_KEYS,
}
HOLDS = {
    "paired": "preference pairs",
    "unpaired": "unpaired labelled rows ('completion' with a 'label', as for KTO)",
    "sft": "SFT rows ('messages' or 'prompt' + 'completion', no 'label')",
}
DEFAULT_PURPOSE = {"paired": "this run", "unpaired": "unpaired (KTO) training", "sft": "SFT"}
KIND_HINTS = {
    ("paired", "unpaired"): "use loss: kto for unpaired data",
    ("paired", "sft"): "train on SFT rows with `preftune sft`",
    ("unpaired", "paired"): "use a paired loss (e.g. sigmoid) for pairs",
    ("unpaired", "sft"): "add a true/false 'label' to every row",
    ("sft", "unpaired"): "SFT would train on every completion whatever its label; keep the label-true rows "
    "without the 'label' column",
}


def check_kind(raw: RawRow, kind: str, purpose: str | None = None) -> None:
    """Raise a DataError when the file's first row (``raw``) holds data that ``kind`` cannot use."""
    found = data_kind(raw.fields)
    usable = {"paired": {"paired"}, "unpaired": {"unpaired"}, "sft": {"sft", "paired"}}[kind]
    if found is None or found in usable:
        return
    keys = sorted(map(str, raw.fields))
    shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
    raise DataError(
        raw.source, None, None,
        f"{purpose or DEFAULT_PURPOSE[kind]} needs {NEEDS[kind]}, but this file holds {HOLDS[found]} "
        f"(row {raw.row} has {shown}); {KIND_HINTS[kind, found]}",
    )


def _check_format(raw: RawRow, first: tuple[int, tuple[str, str]]) -> None:
    """A DataError unless ``raw`` has the format of its file's first row (``(row, row_format)``)."""
    here = row_format(raw.fields)
    first_row, there = first
    if here is None or here[0] == there[0]:
        return
    key = here[1] if here[0] == "conversational" else there[1] if there[0] == "conversational" else "prompt"
    raise DataError(raw.source, raw.row, key,
                    f"{FORMATS[here[0]]} row, but the file's first row (row {first_row}) is "
                    f"{FORMATS[there[0]]}; one file holds one format",
                    "format differs from the file's first row")


def parse_rows(
    rows: Iterable[RawRow],
    *,
    kind: str = "paired",
    tokenizer: Any | None = None,
    skip_bad_rows: bool = False,
    purpose: str | None = None,
) -> LoadedData:
    """Parse raw rows into pairs (``kind="paired"``), unpaired examples (``kind="unpaired"``) or
    SFT examples (``kind="sft"``), all in memory (:func:`iter_examples` streams them)."""
    out = LoadedData()
    kept = {"paired": out.pairs, "unpaired": out.unpaired, "sft": out.sft}.get(kind)
    for example in iter_examples(rows, kind=kind, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows,
                                 purpose=purpose, skips=out):
        kept.append(example)
    return out


def iter_examples(
    rows: Iterable[RawRow],
    *,
    kind: str = "paired",
    tokenizer: Any | None = None,
    skip_bad_rows: bool = False,
    purpose: str | None = None,
    skips: LoadedData,
) -> Iterator[PreferencePair | UnpairedExample | SFTExample]:
    """Parse raw rows one at a time into examples of ``kind``.

    The first well-formed row of each file fixes its format and is checked against ``kind``
    (:func:`check_kind`; ``purpose``, e.g. ``"loss 'kto'"``, names who needs that kind). A bad row
    raises its DataError ending with the skip hint, or with ``skip_bad_rows`` is counted in
    ``skips.skipped``/``skips.skip_reasons``.
    """
    if kind not in ("paired", "unpaired", "sft"):
        raise ValueError(f"kind must be 'paired', 'unpaired' or 'sft', got {kind!r}")
    kind_checked: set[str] = set()
    first: dict[str, tuple[int, tuple[str, str]]] = {}  # per file: (row, row_format) of its first row
    for raw in rows:
        parser = RowParser(raw, tokenizer)
        if isinstance(raw.fields, dict):
            if raw.source not in kind_checked and data_kind(raw.fields) is not None:
                check_kind(raw, kind, purpose)  # a file-level error: never skipped
                kind_checked.add(raw.source)
            if raw.source not in first and row_format(raw.fields) is not None:
                first[raw.source] = (raw.row, row_format(raw.fields))
        try:
            if raw.source in first and isinstance(raw.fields, dict):
                _check_format(raw, first[raw.source])
            example = (parser.pair() if kind == "paired" else parser.unpaired() if kind == "unpaired"
                       else parser.sft())
        except DataError as e:
            if not skip_bad_rows:
                raise e.with_skip_hint() from None
            skips.skipped.append(str(e))
            skips.skip_reasons[e.reason_key] = skips.skip_reasons.get(e.reason_key, 0) + 1
            continue
        yield example


def iter_rows_and_examples(rows: Iterable[RawRow], **parse: Any) -> Iterator[tuple[RawRow, Any]]:
    """(raw row, example) of every row that parses, by :func:`iter_examples` (``parse``: its keywords,
    ``skips`` included): for readers that need a row's other fields beside its example."""
    last: list[RawRow] = []

    def remembered() -> Iterator[RawRow]:
        for raw in rows:
            last[:] = [raw]
            yield raw

    for example in iter_examples(remembered(), **parse):  # yields a row's example before reading on
        yield last[0], example


def load_preference_data(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    kind: str = "paired",
    tokenizer: Any | None = None,
    skip_bad_rows: bool = False,
    purpose: str | None = None,
) -> LoadedData:
    """Load and validate one or more preference (or SFT) files (see the module docstring for formats).
    No row left is a DataError counting the skipped rows per reason, with the first of them."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    total = LoadedData()
    for path in paths:
        total.extend(parse_rows(read_rows(path), kind=kind, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows,
                                purpose=purpose))
    if not total.pairs and not total.unpaired and not total.sft:
        first = total.skipped[0] if total.skipped else ""
        raise no_usable_rows(", ".join(str(p) for p in paths), total.skip_reasons, {}, first)
    return total


def read_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any | None = None, *,
                 skip_bad_rows: bool = False) -> list[Prompt]:
    """The prompts of prompt files (PPO, iterative DPO, evaluation): rows with a ``prompt`` (a
    string, or messages rendered with the tokenizer's chat template), or preference rows with
    ``chosen`` and ``rejected`` (their prompt, split off and rendered as for training), each with its
    ``images`` (as training reads them) and its other columns (:class:`~preftune.data.rows.Prompt`). A bad
    row is a :class:`DataError` naming file, row and field; with ``skip_bad_rows`` it is dropped."""
    prompts = list(iter_prompts(paths, tokenizer, skip_bad_rows=skip_bad_rows))
    if not prompts:
        names = [paths] if isinstance(paths, str | os.PathLike) else paths
        raise DataError(", ".join(str(p) for p in names), None, None, "no prompts")
    return prompts


def iter_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any | None = None, *,
                 skip_bad_rows: bool = False) -> Iterator[Prompt]:
    """The prompts of :func:`read_prompts`, one row at a time."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    for path in paths:
        for raw in read_rows(path):
            try:
                prompt = _prompt_of(raw, tokenizer)
            except DataError as e:
                if not skip_bad_rows:
                    raise e.with_skip_hint() from None
                continue
            if prompt is not None:
                yield prompt


# a prompt row's fields that are not its columns: those that make the prompt, and a preference row's answers
# (a 100k-pair file read as prompts would otherwise hold every answer too: 0.74 GB peak, 0.42 GB without)
PROMPT_KEYS = ("prompt", "images", "chosen", "rejected")


def _prompt_of(raw: RawRow, tokenizer: Any | None) -> Prompt:
    """The prompt of one row of a prompt file (see :func:`read_prompts`)."""
    parser = RowParser(raw, tokenizer)
    fields = parser.fields()
    columns = {k: v for k, v in fields.items() if k not in PROMPT_KEYS}
    if fields.get("chosen") is not None and fields.get("rejected") is not None:
        pair = parser.pair()  # as training splits and renders it
        return Prompt(pair.prompt, pair.images, columns, parser.origin)
    value = fields.get("prompt")
    if value is None:
        raise parser.fail("prompt",
                          "missing (a prompt file's rows need a 'prompt', or 'chosen' and 'rejected')")
    if _is_messages(value):
        template = parser.chat_tokenizer("prompt")
        text = template.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
    elif not isinstance(value, str) or not value.strip():
        raise parser.fail("prompt", f"expected a non-empty string or a list of messages, got {value!r:.40}",
                          "expected a non-empty string or a list of messages")
    else:
        text = value
    return Prompt(text, parser.images(fields), columns, parser.origin)
