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
  :meth:`_RowParser.sft_messages`);
* any preference row above: its chosen side, trained on as a whole.

Every malformed row raises :class:`DataError` naming file, row and field and ending with how to
skip such rows; with ``skip_bad_rows`` the row is dropped and counted (per reason) instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data.io import DataError, RawRow, Unparsable, read_rows

ASSISTANT_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` beats ``rejected`` for ``prompt`` with probability ``preference``.
    Either completion may be empty; ``chosen == rejected`` is allowed here (the tokenizer drops it)."""

    prompt: str
    chosen: str
    rejected: str
    preference: float = 1.0
    origin: str = ""  # "file: row N", for messages
    margin: float = 0.0  # optional reward-model margin (Llama 2 style); DPO losses do not read it


@dataclass(frozen=True)
class UnpairedExample:
    """One KTO example: ``completion`` for ``prompt`` is desirable (``label=True``) or not."""

    prompt: str
    completion: str
    label: bool
    origin: str = ""


@dataclass(frozen=True)
class SFTExample:
    """One SFT example: ``completion`` (the segments' texts joined) continues ``prompt``; each
    segment's flag says whether its tokens are trained on (False: context only, e.g. user turns)."""

    prompt: str
    segments: tuple[tuple[str, bool], ...]
    origin: str = ""

    @property
    def completion(self) -> str:
        return "".join(text for text, _ in self.segments)


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
        parts.append(f"{plural(sum(skip_reasons.values()), 'bad row')} skipped ({count_phrase(skip_reasons)})")
    if drops:
        parts.append(f"{plural(sum(drops.values()), 'pair')} dropped ({count_phrase(drops)})")
    if not parts:
        return DataError(source, None, None, "no usable rows (no rows at all)")
    return DataError(source, None, None, f"no usable rows: {'; '.join(parts)}; first: {first}")


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two full texts into ``(prompt, chosen_completion, rejected_completion)``."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    cut = common.rfind(ASSISTANT_MARKER)
    cut = cut + len(ASSISTANT_MARKER) if cut >= 0 else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _merge_segments(segments: list[tuple[str, bool]]) -> tuple[tuple[str, bool], ...]:
    """Drop empty segments and join neighbours with the same flag (the joined text is unchanged)."""
    out: list[tuple[str, bool]] = []
    for text, trained in segments:
        if not text:
            continue
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return tuple(out)


SFT_KEYS = "'messages', or 'prompt' + 'completion', or 'prompt'/'chosen'/'rejected' (a preference row)"

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


class _RowParser:
    """Parses one raw row; ``fail`` raises a DataError pointing at the row and field."""

    def __init__(self, raw: RawRow, tokenizer: Any | None):
        self.raw, self.tokenizer = raw, tokenizer

    def fail(self, field_name: str | None, message: str, reason: str | None = None) -> DataError:
        return DataError(self.raw.source, self.raw.row, field_name, message, reason)

    @property
    def origin(self) -> str:
        return f"{self.raw.source}: row {self.raw.row}"

    def text(self, fields: dict, key: str, *, allow_empty: bool = False) -> str:
        if key not in fields or fields[key] is None:
            raise self.fail(key, "missing")
        value = fields[key]
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.fail(key, "empty")
        return value

    def completion(self, fields: dict, key: str) -> str:
        """A completion text; one of only whitespace is empty (``""``: EOS alone)."""
        value = self.text(fields, key, allow_empty=True)
        return value if value.strip() else ""

    def number(self, fields: dict, key: str, default: float, low: float = -math.inf, high: float = math.inf) -> float:
        """An optional finite number in [low, high]; absent (None) -> ``default``; NaN/inf are errors."""
        value = fields.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}", "expected a number")
        try:
            x = float(value)
        except OverflowError:  # an int beyond float range
            x = math.inf
        if not math.isfinite(x):
            raise self.fail(key, f"must be a finite number, got {value}", "not a finite number")
        if not low <= x <= high:
            raise self.fail(key, f"must be in [{low:g}, {high:g}], got {value}", f"not in [{low:g}, {high:g}]")
        return x

    def label(self, fields: dict) -> bool:
        """The KTO label: true/false (or 1/0)."""
        if fields.get("label") is None:
            raise self.fail("label", "missing (unpaired data needs a true/false label)")
        value = fields["label"]
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            if value in (0, 1):
                return bool(value)
            raise self.fail("label", f"must be true/false (or 1/0), got {value}", "not true/false (or 1/0)")
        raise self.fail("label", f"expected true or false, got {value!r}", "expected true or false")

    def chat_tokenizer(self, key: str) -> Any:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise self.fail(key, "conversational row, but the tokenizer has no chat template")
        return tok

    def render(self, key: str, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
        """Chat-template ``prompt + completion``; return (prompt_text, completion_text); an empty
        completion (only empty messages) is ``""``, EOS alone as for text rows."""
        tok = self.chat_tokenizer(key)
        prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not any(m["content"].strip() for m in completion):
            return prompt_text, ""
        full = tok.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise self.fail(key, "chat template does not render the prompt as a prefix of the conversation")
        return prompt_text, full[len(prompt_text) :]

    def fields(self) -> dict:
        fields = self.raw.fields
        if isinstance(fields, Unparsable):
            raise self.fail(fields.field, fields.message)
        if not isinstance(fields, dict):
            raise self.fail(None, f"expected an object with fields, got {type(fields).__name__}")
        return fields

    def pair(self) -> PreferencePair:
        fields = self.fields()
        prompt, chosen, rejected = self.pair_texts(fields)
        preference = self.number(fields, "preference", 1.0, 0.0, 1.0)
        margin = self.number(fields, "margin", 0.0)
        return PreferencePair(prompt, chosen, rejected, preference, self.origin, margin)

    def pair_texts(self, fields: dict) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) texts of a preference row in any of its forms; an empty
        completion is ``""``."""
        for key in ("chosen", "rejected"):
            if key not in fields or fields[key] is None:
                raise self.fail(key, "missing")
        if _is_messages(fields["chosen"]) or _is_messages(fields["rejected"]):
            prompt, chosen, rejected = self._conversational(fields)
        elif "prompt" in fields and fields["prompt"] is not None:
            prompt = self.text(fields, "prompt", allow_empty=True)
            chosen, rejected = self.completion(fields, "chosen"), self.completion(fields, "rejected")
        else:  # each text is a whole dialogue; what is left after the shared prompt may be empty
            full_chosen, full_rejected = self.text(fields, "chosen"), self.text(fields, "rejected")
            prompt, chosen, rejected = split_implicit_prompt(full_chosen, full_rejected)
            chosen, rejected = (c if c.strip() else "" for c in (chosen, rejected))
        return prompt, chosen, rejected

    def _conversational(self, fields: dict) -> tuple[str, str, str]:
        chosen, rejected = fields["chosen"], fields["rejected"]
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not _is_messages(value) or not value:
                raise self.fail(key, "expected a non-empty list of {'role', 'content'} messages")
        prompt = fields.get("prompt")
        if prompt is None:
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not _is_messages(prompt):
            raise self.fail("prompt", "expected a string or a list of {'role', 'content'} messages")
        prompt_text, chosen_text = self.render("chosen", prompt, chosen)  # empty completions: ""
        _, rejected_text = self.render("rejected", prompt, rejected)
        return prompt_text, chosen_text, rejected_text

    def unpaired(self) -> UnpairedExample:
        fields = self.fields()
        if fields.get("completion") is None:
            raise self.fail("completion", "missing")
        prompt, completion = self._sft_completion(fields)  # strings, or messages rendered as for SFT rows
        return UnpairedExample(prompt, completion, self.label(fields), self.origin)

    def sft(self) -> SFTExample:
        """An SFT example from a ``messages``, ``prompt``/``completion`` or preference row."""
        fields = self.fields()
        if fields.get("messages") is not None:
            return SFTExample(*self.sft_messages(fields["messages"]), self.origin)
        if fields.get("completion") is not None:
            prompt, completion = self._sft_completion(fields)
            return SFTExample(prompt, ((completion, True),), self.origin)
        if fields.get("chosen") is not None or fields.get("rejected") is not None:
            prompt, chosen, _ = self.pair_texts(fields)  # the chosen side; rejected only shapes the split
            return SFTExample(prompt, ((chosen, True),), self.origin)
        if fields.get("prompt") is not None:
            raise self.fail("completion", f"missing (an SFT row needs {SFT_KEYS})")
        raise self.fail(None, f"an SFT row needs {SFT_KEYS}; got keys {sorted(map(str, fields))}")

    def _sft_completion(self, fields: dict) -> tuple[str, str]:
        prompt, completion = fields.get("prompt"), fields["completion"]
        if not (_is_messages(prompt) or _is_messages(completion)):
            return self.text(fields, "prompt", allow_empty=True), self.completion(fields, "completion")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif prompt is None:
            raise self.fail("prompt", "missing")
        elif not _is_messages(prompt):
            raise self.fail("prompt", "expected a string or a list of {'role', 'content'} messages")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        elif not _is_messages(completion):
            raise self.fail("completion", "expected a string or a list of {'role', 'content'} messages")
        return self.render("completion", prompt, completion)

    def sft_messages(self, messages: Any) -> tuple[str, tuple[tuple[str, bool], ...]]:
        """Split a whole conversation into (prompt, segments), trained on assistant turns only.

        With ``R(m[:i], gen)`` the chat-template rendering of the first ``i`` messages and ``k`` the
        index of the first assistant message: the prompt is ``R(m[:k], gen=True)``; every later
        message ``i`` adds the text ``R(m[:i+1]) - R(m[:i])``, untrained, except that for an assistant
        message the generation prompt ``R(m[:i], gen=True) - R(m[:i])`` is untrained and the rest,
        ``R(m[:i+1]) - R(m[:i], gen=True)`` (content and end-of-turn text), is trained. Each
        rendering must extend the one before it, else the row is a DataError.
        """
        if not _is_messages(messages) or not messages:
            raise self.fail("messages", "expected a non-empty list of {'role', 'content'} messages")
        roles = [m["role"] for m in messages]
        if "assistant" not in roles:
            raise self.fail("messages", "no assistant message (SFT trains on assistant turns)")
        if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
            raise self.fail("messages", "every assistant message is empty")
        tok = self.chat_tokenizer("messages")

        def render(n: int, generation_prompt: bool = False) -> str:
            try:
                return tok.apply_chat_template(
                    messages[:n], tokenize=False, add_generation_prompt=generation_prompt
                )
            except Exception as e:  # template errors (e.g. "roles must alternate") are row errors
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise self.fail("messages", f"chat template failed: {message}") from None

        def added(before: str, after: str, i: int) -> str:
            if not after.startswith(before):
                raise self.fail(
                    "messages",
                    f"chat template does not render the conversation incrementally (at message {i + 1})",
                )
            return after[len(before) :]

        k = roles.index("assistant")
        prompt = text = render(k, True)
        segments: list[tuple[str, bool]] = []
        for i in range(k, len(messages)):
            if roles[i] == "assistant":
                if i > k:  # the first generation prompt is already the end of the prompt
                    head = render(i, True)
                    segments.append((added(text, head, i), False))
                    text = head
                full = render(i + 1)
                segments.append((added(text, full, i), True))
            else:
                full = render(i + 1)
                segments.append((added(text, full, i), False))
            text = full
        return prompt, _merge_segments(segments)


def _check_format(raw: RawRow, first: tuple[int, tuple[str, str]]) -> None:
    """A DataError unless ``raw`` has the format of its file's first row (``(row, row_format)``)."""
    here = row_format(raw.fields)
    first_row, there = first
    if here is None or here[0] == there[0]:
        return
    key = here[1] if here[0] == "conversational" else there[1] if there[0] == "conversational" else "prompt"
    raise DataError(raw.source, raw.row, key,
                    f"{FORMATS[here[0]]} row, but the file's first row (row {first_row}) is {FORMATS[there[0]]}; "
                    "one file holds one format", "format differs from the file's first row")


def parse_rows(
    rows: Iterable[RawRow],
    *,
    kind: str = "paired",
    tokenizer: Any | None = None,
    skip_bad_rows: bool = False,
    purpose: str | None = None,
) -> LoadedData:
    """Parse raw rows into pairs (``kind="paired"``), unpaired examples (``kind="unpaired"``) or
    SFT examples (``kind="sft"``).

    The first well-formed row of each file fixes its format and is checked against ``kind``
    (:func:`check_kind`; ``purpose``, e.g. ``"loss 'kto'"``, names who needs that kind). A bad row
    raises its DataError ending with the skip hint, or with ``skip_bad_rows`` is counted in
    ``skipped``/``skip_reasons``.
    """
    if kind not in ("paired", "unpaired", "sft"):
        raise ValueError(f"kind must be 'paired', 'unpaired' or 'sft', got {kind!r}")
    out = LoadedData()
    kind_checked: set[str] = set()
    first: dict[str, tuple[int, tuple[str, str]]] = {}  # per file: (row, row_format) of its first row
    for raw in rows:
        parser = _RowParser(raw, tokenizer)
        if isinstance(raw.fields, dict):
            if raw.source not in kind_checked and data_kind(raw.fields) is not None:
                check_kind(raw, kind, purpose)  # a file-level error: never skipped
                kind_checked.add(raw.source)
            if raw.source not in first and row_format(raw.fields) is not None:
                first[raw.source] = (raw.row, row_format(raw.fields))
        try:
            if raw.source in first and isinstance(raw.fields, dict):
                _check_format(raw, first[raw.source])
            if kind == "paired":
                out.pairs.append(parser.pair())
            elif kind == "unpaired":
                out.unpaired.append(parser.unpaired())
            else:
                out.sft.append(parser.sft())
        except DataError as e:
            if not skip_bad_rows:
                raise e.with_skip_hint() from None
            out.skipped.append(str(e))
            out.skip_reasons[e.reason_key] = out.skip_reasons.get(e.reason_key, 0) + 1
    return out


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
