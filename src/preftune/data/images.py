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
from collections.abc import Sequence
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


@dataclass
class ImageInputs:
    """The model's side of images: ``processor`` (its Hugging Face processor: image processor +
    tokenizer), the placeholder text ``image_token`` and its id, and ``tokens_per_image``, the
    positions one image's features fill in the token sequence (fixed per model: LLaVA-style)."""

    processor: Any
    image_token: str
    image_token_id: int
    tokens_per_image: int

    @classmethod
    def from_processor(cls, processor: Any, image_token_id: int) -> ImageInputs:
        """Read the placeholder from the processor and count ``tokens_per_image`` by running it once."""
        from PIL import Image

        token = getattr(processor, "image_token", None)
        if not isinstance(token, str):
            raise ValueError("the model's processor names no image_token; "
                             "only LLaVA-style processors are supported")
        out = processor(text=token, images=[Image.new("RGB", (32, 32))], return_tensors="pt")
        extra = sorted(set(out) - {"input_ids", "attention_mask", "pixel_values", "token_type_ids"})
        if extra:  # e.g. image_grid_thw, image_sizes: a variable number of image tokens per image
            raise ValueError(f"the model's processor returns {', '.join(extra)}: only LLaVA-style models, "
                             "whose images each fill a fixed number of tokens, are supported")
        n = int((out["input_ids"] == image_token_id).sum())
        if n < 1:
            raise ValueError(f"the processor does not expand {token!r} into image tokens "
                             f"(id {image_token_id})")
        return cls(processor, token, image_token_id, n)

    def pixel_values(self, refs: Sequence[ImageRef]) -> Tensor:
        """``[I, C, H, W]`` float pixels of ``refs``, as the model's image processor prepares them."""
        import torch

        images = [open_image(r) for r in refs]
        out = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out)

    def expand(self, ids: Sequence[int]) -> list[int]:
        """Token ids with each placeholder id repeated ``tokens_per_image`` times."""
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.tokens_per_image if t == self.image_token_id else [t])
        return out
