"""Images in preference rows: references, reading, and the model-side placeholders.

Row contract: an ``images`` field beside the text fields holds a list, one entry per image, each a
path (relative to the data file's folder, or absolute), a ``data:image/...;base64,`` URI or bare
base64 text, raw bytes, or a ``{"bytes": ..., "path": ...}`` struct (how ``datasets`` stores an
``Image`` column in parquet). Images are part of the prompt:

* conversational rows put ``{"type": "image"}`` parts in the prompt messages where the images go,
  one per image, in order (what chat templates of vision-language models expect);
* standard rows (text prompts) get their images before the prompt text.

Every image is opened and fully decoded once when the file is read, so a missing, unreadable or
truncated image is a one-line error naming the file, the row and the image (``images[i]``); the
pixels are decoded again when a batch is built, so a dataset never sits decoded in memory.

:class:`ImageInputs` holds what the model's processor decides: the placeholder token, how many
token positions one image fills (``tokens_per_image``) and the pixel tensor of a list of images.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where pixels are made: reading rows stays light (the data doctor)
    from torch import Tensor


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: a file (``path``) or encoded bytes (``data``); ``digest`` is the SHA-256
    of the encoded bytes (the cache identity of the pixels)."""

    digest: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def encoded(self) -> bytes:
        if self.data is not None:
            return self.data
        return Path(self.path).read_bytes()

    def as_field(self) -> str:
        """This image as an ``images`` entry of a row written by preftune: its absolute path, or a
        base64 ``data:`` URI for an image given inline."""
        if self.path is not None:
            return str(Path(self.path).resolve())
        return "data:image;base64," + base64.b64encode(self.data or b"").decode("ascii")


class ImageReadError(ValueError):
    """An image that cannot be read; ``index`` is its position in the row's ``images`` list."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _error_text(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _decode(data: bytes) -> Any:
    """Fully decode encoded image bytes into an RGB PIL image (a truncated file fails here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"corrupt image ({_error_text(e)})") from None


def _entry_bytes(value: Any, base_dir: Path) -> tuple[bytes, str | None]:
    """(encoded bytes, resolved path or None) of one ``images`` entry."""
    if isinstance(value, dict):  # datasets' Image struct
        if value.get("bytes"):
            return _entry_bytes(value["bytes"], base_dir)
        if value.get("path"):
            return _entry_bytes(value["path"], base_dir)
        raise ValueError("an image struct needs 'bytes' or 'path'")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a path, base64 text or bytes, got {type(value).__name__}")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise ValueError("a data: URI image must be base64-encoded")
        return _b64(payload), None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        return path.read_bytes(), str(path)
    if len(value) > 256 and "/" not in value[:64]:  # long text that is no path: bare base64
        return _b64(value), None
    raise ValueError(f"no such image file: {path}")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64 image data") from None


def parse_images(value: Any, base_dir: Path) -> tuple[ImageRef, ...]:
    """The ``images`` field of a row -> image references, each image decoded once to check it.
    Raises :class:`ImageReadError` naming the entry that fails."""
    entries = list(value) if isinstance(value, list | tuple) else [value]
    refs = []
    for i, entry in enumerate(entries):
        try:
            data, path = _entry_bytes(entry, base_dir)
            _decode(data)
        except (OSError, ValueError) as e:
            raise ImageReadError(i, _error_text(e)) from None
        refs.append(ImageRef(hashlib.sha256(data).hexdigest(), path, None if path is not None else data))
    return tuple(refs)


def open_image(ref: ImageRef) -> Any:
    """The RGB PIL image of ``ref``."""
    return _decode(ref.encoded())


def image_size(ref: ImageRef) -> tuple[int, int]:
    """``(width, height)`` of ``ref`` from its header (no pixels decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(ref.encoded())) as img:
        return img.size


@dataclass
class ImageInputs:
    """The model's side of images, read from its Hugging Face ``processor`` (image processor + tokenizer).

    A prompt holds the placeholder ``image_token`` (id ``image_token_id``) once per image; the
    processor decides what it becomes: :meth:`expansion` is the token ids of one image of a given size
    (LLaVA: a fixed number of image tokens; LLaVA-NeXT: a number that depends on the size; Idefics3: tiles
    of image tokens between structure tokens such as ``<fake_token_around_image>`` and ``<row_1_col_2>``).
    The positions holding ``feature_token_id`` take the image features, in order. An image's expansion
    depends only on its size (the processor is run once per size, on a blank image), so prompts are
    tokenized as text and each placeholder id is replaced by its image's expansion.
    """

    processor: Any
    image_token: str
    image_token_id: int
    feature_token_id: int
    _expansions: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict, repr=False)
    _edges: tuple[int, int] = (0, 0)  # the tokenizer's specials around a lone placeholder: (before, after)
    structure_ids: set[int] = field(default_factory=set, repr=False)  # special tokens of expansions
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # digest -> (width, height)
    # families with 3-D rotary positions (Qwen2-VL's mrope): an image size -> its merged patch grid
    # (t, h, w), whose tokens it fills in t, h, w order; None: positions are 1-D
    grid: Callable[[tuple[int, int]], tuple[int, int, int]] | None = field(default=None, repr=False)
    # families whose images become other tokens in a row with several images (LLaVA-OneVision: any-resolution
    # tiles for an image alone, its base tile otherwise): expansions and pixels then depend on the row
    by_row: bool = False

    @classmethod
    def from_processor(cls, processor: Any, feature_token_id: int) -> ImageInputs:
        """Read the placeholder from ``processor`` (its ``image_token``: the text a prompt holds per image;
        Gemma 3's is ``<start_of_image>``, which it expands around its soft image tokens); check that it
        expands into ``feature_token_id`` tokens, the model's image token."""
        token = getattr(processor, "image_token", None)
        if not isinstance(token, str):
            raise ValueError("the model's processor names no image_token")
        placeholder = processor.tokenizer.convert_tokens_to_ids(token)
        lone = processor.tokenizer(token)["input_ids"]
        if lone.count(placeholder) != 1:
            raise ValueError(f"the tokenizer does not encode the processor's image_token {token!r} as one "
                             "token")
        at = lone.index(placeholder)
        inputs = cls(processor, token, placeholder, feature_token_id, _edges=(at, len(lone) - at - 1))
        if inputs.feature_token_id not in inputs.expansion((32, 32)):
            raise ValueError(f"the processor does not expand {token!r} into image tokens "
                             f"(id {feature_token_id})")
        return inputs

    def expansion(self, size: tuple[int, int], alone: bool = True) -> tuple[int, ...]:
        """The token ids an image of ``size`` (width, height) fills in place of its placeholder; ``alone``:
        the only image of its row (it matters where :attr:`by_row`)."""
        key = (size, alone or not self.by_row)
        if key not in self._expansions:
            from PIL import Image

            copies = 1 if key[1] else 2  # two images of one size in one row: each fills half the tokens
            out = self.processor(text=self.image_token * copies, images=[Image.new("RGB", size)] * copies)
            ids = [int(t) for t in out["input_ids"][0]]
            before, after = self._edges
            expanded = tuple(ids[before : len(ids) - after])
            expanded = expanded[: len(expanded) // copies]
            special = set(getattr(self.processor.tokenizer, "all_special_ids", ()))
            special |= set(self.processor.tokenizer.get_added_vocab().values())
            self.structure_ids |= {t for t in expanded if t in special} - {self.feature_token_id}
            self._expansions[key] = expanded
        return self._expansions[key]

    def size_of(self, ref: ImageRef) -> tuple[int, int]:
        """``image_size(ref)``, read once per image (batches ask again for the positions)."""
        if ref.digest not in self._sizes:
            self._sizes[ref.digest] = image_size(ref)
        return self._sizes[ref.digest]

    def expand(self, ids: Sequence[int], refs: Sequence[ImageRef]) -> list[int]:
        """Token ids with the k-th placeholder replaced by the expansion of ``refs[k]``."""
        out: list[int] = []
        k = 0
        for t in ids:
            if t == self.image_token_id:
                out.extend(self.expansion(self.size_of(refs[k]), alone=len(refs) == 1))
                k += 1
            else:
                out.append(t)
        return out

    def feature_positions(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Where in ``ids`` the image features go (the positions holding ``feature_token_id``)."""
        return tuple(i for i, t in enumerate(ids) if t == self.feature_token_id)

    def image_token_count(self, ids: Sequence[int]) -> int:
        """Positions of ``ids`` that belong to images: feature tokens and the expansions' special tokens
        (a truncation that changes it cut an image)."""
        marks = self.structure_ids | {self.feature_token_id}
        return sum(1 for t in ids if t in marks)

    def rope_positions(self, prompt: Sequence[int],
                       refs: Sequence[ImageRef]) -> tuple[list[tuple[int, ...]], int]:
        """3-D rotary positions (t, h, w) of ``prompt``'s tokens and the position that follows it, as
        Qwen2-VL builds them: a text token at p is (p, p, p) and moves p on by 1; an image's tokens,
        its merged grid (t, h, w) in order, are (p + i, p + j, p + k), and p moves on by max(t, h, w)."""
        assert self.grid is not None
        out: list[tuple[int, ...]] = []
        p, i, k = 0, 0, 0
        while i < len(prompt):
            if prompt[i] != self.feature_token_id:
                out.append((p, p, p))
                p, i = p + 1, i + 1
                continue
            t, h, w = self.grid(self.size_of(refs[k]))
            out += [(p + a, p + b, p + c) for a in range(t) for b in range(h) for c in range(w)]
            p, i, k = p + max(t, h, w), i + t * h * w, k + 1
        return out, p

    def pixel_inputs(self, refs: Sequence[ImageRef], rows: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The image processor's tensors for ``refs``, in order: ``pixel_values`` and what the model's
        ``get_image_features`` takes beside it (``image_sizes``, ``pixel_attention_mask``,
        ``image_grid_thw``, LLaVA-OneVision's ``batch_num_images``). Dim 0 is the image, except Qwen2-VL's
        ``pixel_values``: every image's patches, one after the other. ``rows``: how many of ``refs`` each
        row holds, in order (needed where :attr:`by_row`; one row per image when None)."""
        import torch

        opened = [open_image(r) for r in refs]
        if self.by_row and rows is not None:  # each row's images together: the processor tiles a lone one
            if sum(rows) != len(refs):
                raise ValueError(f"rows count {sum(rows)} images, refs hold {len(refs)}")
            starts = [sum(rows[:i]) for i in range(len(rows))]
            images = [opened[a : a + n] for a, n in zip(starts, rows)]
        else:
            images = [[image] for image in opened]  # one image per sample
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {k: torch.as_tensor(v) for k, v in out.items() if k not in ("rows", "cols")}

    def pixel_values(self, refs: Sequence[ImageRef], rows: Sequence[int] | None = None) -> Tensor:
        """``pixel_values`` of :meth:`pixel_inputs`."""
        return self.pixel_inputs(refs, rows)["pixel_values"]
