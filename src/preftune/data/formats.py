"""Turn raw rows into text pairs. The dataset contract:

* standard:        ``{"prompt": str, "chosen": str, "rejected": str}``
* conversational:  the same keys holding lists of ``{"role", "content"}`` messages, rendered with the
                   tokenizer's chat template (``prompt`` may be omitted: the shared leading messages are
                   the prompt)
* implicit prompt: only ``chosen`` and ``rejected`` strings sharing a prefix (Anthropic HH). The prompt
                   ends after the last ``"\\n\\nAssistant:"`` inside the shared prefix, or at the end of
                   the longest common prefix when there is no such marker.
* unpaired (KTO):  ``{"prompt": str, "completion": str, "label": bool}``
* optional ``preference`` in [0, 1]: P(chosen beats rejected), default 1; optional ``margin``
  (a number, read by the reward-model loss only).

Supervised fine-tuning (``kind="sft"``) accepts, per row:

* ``{"prompt": str, "completion": str}``: the whole completion is trained on;
* ``prompt``/``completion`` as message lists (a string on either side is a user/assistant message):
  rendered with the chat template like the conversational pairs, the whole completion trained on;
* ``{"messages": [...]}``: a whole conversation, trained on the assistant turns only (see
  :meth:`_RowParser.sft_messages`);
* any preference row above: its chosen side, trained on as a whole.

Every malformed row raises :class:`DataError` naming file, row and field; with ``skip_bad_rows``
the row is dropped and counted instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data.io import DataError, RawRow, Unparsable, read_rows

ASSISTANT_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` beats ``rejected`` for ``prompt`` with probability ``preference``."""

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
    """Rows that parsed, and the messages of rows that were skipped."""

    pairs: list[PreferencePair] = field(default_factory=list)
    unpaired: list[UnpairedExample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sft: list[SFTExample] = field(default_factory=list)


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


class _RowParser:
    """Parses one raw row; ``fail`` raises a DataError pointing at the row and field."""

    def __init__(self, raw: RawRow, tokenizer: Any | None):
        self.raw, self.tokenizer = raw, tokenizer

    def fail(self, field_name: str | None, message: str) -> DataError:
        return DataError(self.raw.source, self.raw.row, field_name, message)

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

    def number(self, fields: dict, key: str, default: float, low: float, high: float) -> float:
        value = fields.get(key)
        if value is None or (isinstance(value, float) and value != value):  # missing (None/NaN cell)
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}")
        if not low <= float(value) <= high:
            raise self.fail(key, f"must be in [{low:g}, {high:g}], got {value}")
        return float(value)

    def chat_tokenizer(self, key: str) -> Any:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise self.fail(key, "conversational row, but the tokenizer has no chat template")
        return tok

    def render(self, key: str, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
        """Chat-template ``prompt + completion``; return (prompt_text, completion_text)."""
        tok = self.chat_tokenizer(key)
        prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise self.fail(key, "chat template does not render the prompt as a prefix of the conversation")
        return prompt_text, full[len(prompt_text) :]

    def fields(self) -> dict:
        fields = self.raw.fields
        if isinstance(fields, Unparsable):
            raise self.fail(None, fields.message)
        if not isinstance(fields, dict):
            raise self.fail(None, f"expected an object with fields, got {type(fields).__name__}")
        return fields

    def pair(self) -> PreferencePair:
        fields = self.fields()
        prompt, chosen, rejected = self.pair_texts(fields)
        if chosen == rejected:
            raise self.fail("rejected", "identical to chosen")
        preference = self.number(fields, "preference", 1.0, 0.0, 1.0)
        margin = self.number(fields, "margin", 0.0, float("-inf"), float("inf"))
        return PreferencePair(prompt, chosen, rejected, preference, self.origin, margin)

    def pair_texts(self, fields: dict) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) texts of a preference row in any of its forms."""
        for key in ("chosen", "rejected"):
            if key not in fields or fields[key] is None:
                raise self.fail(key, "missing")
        if _is_messages(fields["chosen"]) or _is_messages(fields["rejected"]):
            prompt, chosen, rejected = self._conversational(fields)
        elif "prompt" in fields and fields["prompt"] is not None:
            prompt = self.text(fields, "prompt", allow_empty=True)
            chosen, rejected = self.text(fields, "chosen"), self.text(fields, "rejected")
        else:
            full_chosen, full_rejected = self.text(fields, "chosen"), self.text(fields, "rejected")
            prompt, chosen, rejected = split_implicit_prompt(full_chosen, full_rejected)
            for key, value in (("chosen", chosen), ("rejected", rejected)):
                if not value.strip():
                    raise self.fail(key, "empty completion after splitting off the shared prompt")
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
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value or not any(m["content"].strip() for m in value):
                raise self.fail(key, "empty completion")
        prompt_text, chosen_text = self.render("chosen", prompt, chosen)
        _, rejected_text = self.render("rejected", prompt, rejected)
        return prompt_text, chosen_text, rejected_text

    def unpaired(self) -> UnpairedExample:
        fields = self.fields()
        prompt = self.text(fields, "prompt", allow_empty=True)
        completion = self.text(fields, "completion")
        if "label" not in fields:
            raise self.fail("label", "missing (unpaired data needs a true/false label)")
        label = fields["label"]
        if not isinstance(label, bool):
            raise self.fail("label", f"expected true or false, got {label!r}")
        return UnpairedExample(prompt, completion, label, self.origin)

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
            return self.text(fields, "prompt", allow_empty=True), self.text(fields, "completion")
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
        if not any(m["content"].strip() for m in completion):
            raise self.fail("completion", "empty completion")
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


def parse_rows(
    rows: Iterable[RawRow], *, kind: str = "paired", tokenizer: Any | None = None, skip_bad_rows: bool = False
) -> LoadedData:
    """Parse raw rows into pairs (``kind="paired"``), unpaired examples (``kind="unpaired"``) or
    SFT examples (``kind="sft"``)."""
    if kind not in ("paired", "unpaired", "sft"):
        raise ValueError(f"kind must be 'paired', 'unpaired' or 'sft', got {kind!r}")
    out = LoadedData()
    for raw in rows:
        parser = _RowParser(raw, tokenizer)
        try:
            if kind == "paired":
                out.pairs.append(parser.pair())
            elif kind == "unpaired":
                out.unpaired.append(parser.unpaired())
            else:
                out.sft.append(parser.sft())
        except DataError as e:
            if not skip_bad_rows:
                raise
            out.skipped.append(str(e))
    return out


def load_preference_data(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    kind: str = "paired",
    tokenizer: Any | None = None,
    skip_bad_rows: bool = False,
) -> LoadedData:
    """Load and validate one or more preference (or SFT) files (see the module docstring for formats)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    total = LoadedData()
    for path in paths:
        part = parse_rows(read_rows(path), kind=kind, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows)
        total.pairs += part.pairs
        total.unpaired += part.unpaired
        total.skipped += part.skipped
        total.sft += part.sft
    if not total.pairs and not total.unpaired and not total.sft:
        raise DataError(", ".join(str(p) for p in paths), None, None, "no usable rows")
    return total
