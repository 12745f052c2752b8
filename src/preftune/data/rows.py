"""One raw row -> one example: the example dataclasses and :class:`RowParser`, which parses a row
by the contract and rules of :mod:`preftune.data.formats` (the file-level rules, one format and one data
kind per file, are checked there)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.images import ImageReadError, ImageRef, parse_images
from preftune.data.io import DataError, RawRow, Unparsable

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
    images: tuple[ImageRef, ...] = ()  # part of the prompt (see preftune.data.images)
    # character offsets in ``prompt`` where whole text turns before the first image end: where
    # truncation may cut
    prompt_turns: tuple[int, ...] = ()


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt file (PPO, iterative DPO, evaluation): the rendered ``text``, its ``images``
    (part of the prompt, placed as in training) and the row's other ``columns`` (e.g. a ground-truth
    ``answer``), which a judge may take as keyword arguments. Equal prompts have equal text and images."""

    text: str
    images: tuple[ImageRef, ...] = ()
    columns: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    origin: str = field(default="", compare=False)  # "file: row N"

    def images_field(self) -> dict[str, list[str]]:
        """``{"images": [...]}`` for a row written from this prompt (absolute paths, data URIs), or ``{}``."""
        return {"images": [r.as_field() for r in self.images]} if self.images else {}


def as_prompt(prompt: str | Prompt) -> Prompt:
    """A prompt given as text is a :class:`Prompt` without images or columns."""
    return prompt if isinstance(prompt, Prompt) else Prompt(prompt)


@dataclass(frozen=True)
class UnpairedExample:
    """One KTO example: ``completion`` for ``prompt`` is desirable (``label=True``) or not."""

    prompt: str
    completion: str
    label: bool
    origin: str = ""
    images: tuple[ImageRef, ...] = ()
    prompt_turns: tuple[int, ...] = ()


@dataclass(frozen=True)
class SFTExample:
    """One SFT example: ``completion`` (the segments' texts joined) continues ``prompt``; each
    segment's flag says whether its tokens are trained on (False: context only, e.g. user turns)."""

    prompt: str
    segments: tuple[tuple[str, bool], ...]
    origin: str = ""
    images: tuple[ImageRef, ...] = ()
    prompt_turns: tuple[int, ...] = ()

    @property
    def completion(self) -> str:
        return "".join(text for text, _ in self.segments)


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


def _is_part(part: Any) -> bool:
    """A content part of a multi-modal message: ``{"type": "text", "text": ...}`` or ``{"type": "image"}``."""
    if not isinstance(part, dict):
        return False
    return part.get("type") == "image" or (part.get("type") == "text" and isinstance(part.get("text"), str))


def _is_messages(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages; content is text or a list of parts."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and (isinstance(m.get("content"), str)
             or (isinstance(m.get("content"), list) and all(_is_part(p) for p in m["content"])))
        for m in value
    )


def message_text(message: dict) -> str:
    """The text of a message (its text parts joined, for multi-modal content)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str)
               for p in m["content"] if p["type"] == "image")


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


class RowParser:
    """Parses one raw row; ``fail`` raises a DataError pointing at the row and field."""

    def __init__(self, raw: RawRow, tokenizer: Any | None):
        self.raw, self.tokenizer = raw, tokenizer
        # see PreferencePair.prompt_turns; set when a prompt with images renders
        self.turns: tuple[int, ...] = ()

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

    def number(self, fields: dict, key: str, default: float, low: float = -math.inf,
               high: float = math.inf) -> float:
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
            raise self.fail(key, f"must be in [{low:g}, {high:g}], got {value}",
                            f"not in [{low:g}, {high:g}]")
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
        self.turns = self._turn_starts(tok, prompt, prompt_text)
        if not any(message_text(m).strip() for m in completion):
            return prompt_text, ""
        full = tok.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise self.fail(key, "chat template does not render the prompt as a prefix of the conversation")
        return prompt_text, full[len(prompt_text) :]

    def _turn_starts(self, tok: Any, messages: list[dict], text: str) -> tuple[int, ...]:
        """Where message ``i`` starts in the rendered ``text``, for every message up to the first one
        with an image (truncation of a prompt with images drops whole turns before its images first)."""
        if not (isinstance(self.raw.fields, dict) and self.raw.fields.get("images")):
            return ()
        first_image = next((i for i, m in enumerate(messages) if count_image_parts([m])), len(messages))
        starts = []
        for i in range(1, min(first_image + 1, len(messages))):
            head = tok.apply_chat_template(messages[:i], tokenize=False)
            if text.startswith(head):
                starts.append(len(head))
        return tuple(starts)

    def images(self, fields: dict) -> tuple[ImageRef, ...]:
        """The row's images (see :mod:`preftune.data.images`); with conversational text, the number of
        ``{"type": "image"}`` parts in the prompt must equal the number of images, and completions hold
        none."""
        value = fields.get("images")
        placed = self._image_parts(fields)
        if value is None or (isinstance(value, list | tuple) and not value):
            if placed:
                raise self.fail("images", f"missing: the messages hold {placed} image placeholder(s)")
            return ()
        try:
            refs = parse_images(value, Path(self.raw.source).parent)
        except ImageReadError as e:
            raise self.fail(f"images[{e.index}]", str(e)) from None
        if placed is not None and placed != len(refs):
            raise self.fail("images", f"{len(refs)} image(s) but {placed} {{'type': 'image'}} placeholder(s) "
                                      "in the prompt messages")
        return refs

    def _image_parts(self, fields: dict) -> int | None:
        """Image placeholders in the prompt messages (None for text rows); one in a completion is an error."""
        prompt_keys, completion_keys = ("prompt",), ("chosen", "rejected", "completion")
        if _is_messages(fields.get("messages")):  # SFT conversations: images go in the user turns
            messages = fields["messages"]
            if any(count_image_parts([m]) for m in messages if m["role"] == "assistant"):
                raise self.fail("messages",
                                "an assistant message holds an image; images belong to the prompt")
            return count_image_parts(messages)
        for key in completion_keys:
            explicit_prompt = "prompt" in fields or key == "completion"
            if explicit_prompt and _is_messages(fields.get(key)) and count_image_parts(fields[key]):
                raise self.fail(key, "holds an image; images belong to the prompt")
        conversational = [fields[k] for k in (*prompt_keys, *completion_keys) if _is_messages(fields.get(k))]
        if not conversational:
            return None
        if _is_messages(fields.get("prompt")):
            return count_image_parts(fields["prompt"])
        if "prompt" not in fields or fields["prompt"] is None:  # implicit prompt: the shared messages
            chosen = fields.get("chosen") if _is_messages(fields.get("chosen")) else []
            rejected = fields.get("rejected") if _is_messages(fields.get("rejected")) else []
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            return count_image_parts(chosen[:n])
        return None  # a text prompt: its images go before it

    def fields(self) -> dict:
        fields = self.raw.fields
        if isinstance(fields, Unparsable):
            raise self.fail(fields.field, fields.message)
        if not isinstance(fields, dict):
            raise self.fail(None, f"expected an object with fields, got {type(fields).__name__}")
        return fields

    def pair(self) -> PreferencePair:
        fields = self.fields()
        images = self.images(fields)
        prompt, chosen, rejected = self.pair_texts(fields)
        preference = self.number(fields, "preference", 1.0, 0.0, 1.0)
        margin = self.number(fields, "margin", 0.0)
        return PreferencePair(prompt, chosen, rejected, preference, self.origin, margin, images, self.turns)

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
        images = self.images(fields)
        prompt, completion = self._sft_completion(fields)  # strings, or messages rendered as for SFT rows
        return UnpairedExample(prompt, completion, self.label(fields), self.origin, images, self.turns)

    def sft(self) -> SFTExample:
        """An SFT example from a ``messages``, ``prompt``/``completion`` or preference row."""
        fields = self.fields()
        images = self.images(fields)
        if fields.get("messages") is not None:
            return SFTExample(*self.sft_messages(fields["messages"]), self.origin, images, self.turns)
        if fields.get("completion") is not None:
            prompt, completion = self._sft_completion(fields)
            return SFTExample(prompt, ((completion, True),), self.origin, images, self.turns)
        if fields.get("chosen") is not None or fields.get("rejected") is not None:
            prompt, chosen, _ = self.pair_texts(fields)  # the chosen side; rejected only shapes the split
            return SFTExample(prompt, ((chosen, True),), self.origin, images, self.turns)
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
        if not any(message_text(m).strip() for m in messages if m["role"] == "assistant"):
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
        self.turns = self._turn_starts(tok, messages[:k], prompt)
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
