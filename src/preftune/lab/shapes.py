"""Synthetic shape images and one-word questions about them: the data of the vision lab.

A tiny LLaVA-style model (a 32x32 vision tower with 8x8 patches in front of a small language model)
is first SFT-ed and then DPO-ed on questions about these images, fully offline. Every image shows
1 to 3 shapes of one colour (red, green, blue, yellow) and one kind (circle, square, triangle) at
seeded, non-overlapping positions on a low-amplitude grey-noise background. Each question asks for
one attribute and has a single lowercase word as its answer:

* ``colour``: ``red`` / ``green`` / ``blue`` / ``yellow``;
* ``shape``: ``circle`` / ``square`` / ``triangle``;
* ``count``: ``one`` / ``two`` / ``three``.

The three kinds are deliberately unequal. Colour is easy: it is the mean of a few patches and any
patch that touches a shape gives it away. Shape and count are harder: at 8-12 px a circle, a square
and a triangle differ in a handful of edge pixels, and counting needs the model to tell shapes that
straddle patch borders apart. So after SFT there is room left for DPO to improve, most on shape and
count, and a per-kind accuracy shows where it did. The answers are exact words, so :func:`grade` is
a cheap, unambiguous reward.

Everything is deterministic: a :class:`ShapeScene` carries its own integer seed, and the same scene
renders to byte-identical pixels (positions, sizes, colour jitter and noise come from ``random``
streams seeded by the scene, stable across Python versions). :func:`make_examples` draws balanced,
reproducible example sets; :func:`write_dataset` saves them as PNGs plus a JSONL file in the
conversational-with-images format the trainer reads (``sft`` rows with ``messages``, or held-out
``prompts`` rows with ``prompt``, ``answer`` and ``kind``).
"""

from __future__ import annotations

import io
import json
import os
import random
import string
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
KINDS: tuple[str, ...] = ("colour", "shape", "count")

QUESTIONS: dict[str, str] = {
    "colour": "What colour are the shapes?",
    "shape": "What kind of shape is shown?",
    "count": "How many shapes are there?",
}

# Every possible answer of each kind, in a fixed order (what make_examples balances over).
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "count": tuple(COUNT_WORDS[c] for c in COUNTS),
}

# Nominal fill colours; each image jitters its colour by up to COLOUR_JITTER per channel.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 75, 220),
    "yellow": (230, 205, 40),
}
COLOUR_JITTER = 15
# Background: one grey level per image in [BACKGROUND_LOW, BACKGROUND_HIGH], plus per-pixel grey
# noise of at most NOISE_AMPLITUDE (the same on all three channels, so it stays grey).
BACKGROUND_LOW, BACKGROUND_HIGH = 100, 140
NOISE_AMPLITUDE = 12

# Shape widths in px at the reference size of 32, by count (scaled linearly for other sizes):
# smaller shapes when there are more of them, so three always fit with room to spare.
REFERENCE_SIZE = 32
WIDTHS: dict[int, tuple[int, int]] = {1: (10, 12), 2: (9, 11), 3: (8, 10)}
MIN_SIZE = 16

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive pixel bounds


@dataclass(frozen=True)
class ShapeScene:
    """What one image shows: ``count`` shapes of one ``colour`` and one ``shape``, laid out and
    painted from ``seed``."""

    colour: str
    shape: str
    count: int
    seed: int

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {COLOURS}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if isinstance(self.count, bool) or self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {self.count!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def answer(self, kind: str) -> str:
        """The one-word answer to the question of ``kind`` about this scene."""
        if kind == "colour":
            return self.colour
        if kind == "shape":
            return self.shape
        if kind == "count":
            return COUNT_WORDS[self.count]
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    @property
    def filename(self) -> str:
        """The PNG name of this scene, e.g. ``red-circle-2-s17.png``."""
        return f"{self.colour}-{self.shape}-{self.count}-s{self.seed}.png"


@dataclass(frozen=True)
class VisionExample:
    """One question about one scene, with its one-word answer."""

    scene: ShapeScene
    kind: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.answer != self.scene.answer(self.kind):
            raise ValueError(
                f"answer {self.answer!r} does not match the scene's {self.kind} "
                f"{self.scene.answer(self.kind)!r}"
            )


def example(scene: ShapeScene, kind: str) -> VisionExample:
    """The example asking ``QUESTIONS[kind]`` about ``scene``."""
    return VisionExample(scene=scene, kind=kind, question=QUESTIONS[kind], answer=scene.answer(kind))


def _rng(scene: ShapeScene, stream: str) -> random.Random:
    # Seeding with a str hashes it (sha512): stable across runs, platforms and Python versions,
    # and independent of PYTHONHASHSEED. Separate streams keep the layout independent of painting.
    return random.Random(f"preftune-shapes:{stream}:{scene.colour}:{scene.shape}:{scene.count}:{scene.seed}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")


def _apart(a: Box, b: Box, gap: int) -> bool:
    """Whether boxes a and b are separated by at least ``gap`` empty pixels along x or y."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def layout(scene: ShapeScene, size: int = REFERENCE_SIZE) -> list[Box]:
    """The bounding boxes (x0, y0, x1, y1, inclusive) of the scene's shapes in a ``size`` px image.

    Each box is square, ``WIDTHS[count]`` px wide at 32 px (scaled with ``size``), at least
    ``margin`` px inside the image and at least ``gap`` empty pixels away from every other box, so
    the shapes never touch (a 4-connected count of the shape pixels equals ``count``).
    """
    _check_size(size)
    rng = _rng(scene, "layout")
    lo, hi = (max(3, round(w * size / REFERENCE_SIZE)) for w in WIDTHS[scene.count])
    margin = max(1, size // 32)
    gap = max(2, size // 16)
    for _attempt in range(200):
        boxes: list[Box] = []
        for _ in range(scene.count):
            for _try in range(100):
                w = rng.randint(lo, hi)
                x = rng.randint(margin, size - margin - w)
                y = rng.randint(margin, size - margin - w)
                box = (x, y, x + w - 1, y + w - 1)
                if all(_apart(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == scene.count:
            return boxes
    # Unreachable in practice (three shapes take well under half the image); a fixed 2x2 grid of
    # cells, one shape in the corner of each, keeps the function total and deterministic.
    return _grid_layout(scene.count, size, lo, margin, gap)


def _grid_layout(count: int, size: int, width: int, margin: int, gap: int) -> list[Box]:
    cell = (size - 2 * margin) // 2
    w = min(width, cell - gap - 1)
    corners = [(margin + (i % 2) * cell, margin + (i // 2) * cell) for i in range(count)]
    return [(x, y, x + w - 1, y + w - 1) for x, y in corners]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: int) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle: upright, base along the bottom of the box, apex at the top centre
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def shape_mask(scene: ShapeScene, size: int = REFERENCE_SIZE) -> Image.Image:
    """An ``L`` image, 255 on the scene's shape pixels and 0 elsewhere (what render_image paints)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for box in layout(scene, size):
        _draw_shape(draw, scene.shape, box, 255)
    return mask


def render_image(spec: ShapeScene, size: int = REFERENCE_SIZE) -> Image.Image:
    """The RGB ``size`` x ``size`` image of ``spec``: its shapes, one flat (jittered) colour, on grey
    noise. Deterministic: the same spec and size give byte-identical pixels."""
    _check_size(size)
    rng = _rng(spec, "paint")
    grey = rng.randint(BACKGROUND_LOW, BACKGROUND_HIGH)
    raw = np.frombuffer(rng.randbytes(size * size), dtype=np.uint8).astype(np.int16)
    noise = raw % (2 * NOISE_AMPLITUDE + 1) - NOISE_AMPLITUDE
    plane = np.clip(grey + noise, 0, 255).astype(np.uint8).reshape(size, size)
    image = Image.fromarray(np.stack([plane] * 3, axis=-1), mode="RGB")
    fill = tuple(
        min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in PALETTE[spec.colour]
    )
    image.paste(fill, (0, 0, size, size), mask=shape_mask(spec, size))
    return image


def make_examples(n: int, seed: int) -> list[VisionExample]:
    """``n`` examples, deterministic for ``seed``, balanced over kinds and, within a kind, over its
    answers: in every prefix the kinds cycle colour, shape, count, and each kind's answers come in
    successive shuffled rounds, so any count differs from its fair share by at most one. The
    attributes not asked about, and the scene seeds, are drawn at random."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(f"preftune-shapes-examples:{seed}")
    queues: dict[str, list[str]] = {kind: [] for kind in KINDS}
    out: list[VisionExample] = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if not queues[kind]:
            queues[kind] = list(ANSWERS[kind])
            rng.shuffle(queues[kind])
        answer = queues[kind].pop()
        colour = answer if kind == "colour" else rng.choice(COLOURS)
        shape = answer if kind == "shape" else rng.choice(SHAPES)
        count = COUNTS[ANSWERS["count"].index(answer)] if kind == "count" else rng.choice(COUNTS)
        scene = ShapeScene(colour=colour, shape=shape, count=count, seed=rng.randrange(1_000_000))
        out.append(example(scene, kind))
    return out


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(string.punctuation + "\u201c\u201d\u2018\u2019").lower() if words else ""


def grade(example: VisionExample, text: str) -> bool:
    """Whether the model's answer ``text`` is right: its first word, lowercased and stripped of
    surrounding punctuation, equals the example's answer exactly ("Red." and "red circle" are right
    for red; "2" is not "two", and "grey", the background, is never an answer)."""
    return _first_word(text) == example.answer


def judge(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
          images: Sequence[Any] = ()) -> list[float]:
    """The ground truth as a reward for the prompt rows :func:`write_dataset` writes (``kind="prompts"``,
    whose ``answer`` column is the truth about the row's image): 1.0 where a completion is right by
    :func:`grade`'s rule, else 0.0. For ``preftune iterate`` and ``preftune eval`` on the lab's prompts:
    ``--judge preftune.lab.shapes:judge``."""
    return [float(_first_word(text) == truth) for text, truth in zip(completions, answer)]


def _user_turn(question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def _row(ex: VisionExample, image: str, kind: str) -> dict[str, Any]:
    if kind == "sft":
        return {
            "messages": [
                _user_turn(ex.question),
                {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]},
            ],
            "images": [image],
        }
    return {"prompt": [_user_turn(ex.question)], "images": [image], "answer": ex.answer, "kind": ex.kind}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(scene: ShapeScene, size: int = REFERENCE_SIZE) -> bytes:
    """The scene's image encoded as PNG (no metadata, so the bytes are deterministic too)."""
    buf = io.BytesIO()
    render_image(scene, size).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(
    examples: Iterable[VisionExample],
    directory: Path,
    *,
    name: str,
    kind: str,
    size: int = REFERENCE_SIZE,
) -> Path:
    """Write ``directory/{name}.jsonl`` (one row per example, in order) and each distinct scene's PNG
    under ``directory/images/`` (once per scene); return the JSONL path.

    ``kind="sft"`` rows are ``{"messages": [user(image, question), assistant(answer)], "images": [...]}``;
    ``kind="prompts"`` rows are ``{"prompt": [user(image, question)], "images": [...], "answer", "kind"}``.
    Image paths are relative to the JSONL's directory, with ``/`` separators. Every file is written
    atomically (a temporary file, then ``os.replace``).
    """
    if kind not in ("sft", "prompts"):
        raise ValueError(f"kind must be 'sft' or 'prompts', got {kind!r}")
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    directory = Path(directory)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: set[ShapeScene] = set()
    lines: list[str] = []
    for ex in examples:
        if ex.scene not in written:
            _atomic_write(images / ex.scene.filename, png_bytes(ex.scene, size))
            written.add(ex.scene)
        lines.append(json.dumps(_row(ex, f"images/{ex.scene.filename}", kind)))
    path = directory / f"{name}.jsonl"
    _atomic_write(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return path
