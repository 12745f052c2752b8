"""Judges for prompts with images, importable as ``image_judges:<name>`` (tests/ is on the path): they
check that each item's images arrive as existing files and record what they were given."""

from __future__ import annotations

from pathlib import Path

CALLS: list[dict] = []


def looks(prompts, completions, images, kind=None):
    """A reward that reads its images: the completion's length plus the first image's byte size mod 7."""
    assert len(images) == len(completions) and all(Path(p).is_file() for item in images for p in item)
    CALLS.append({"prompts": list(prompts), "images": [list(i) for i in images], "kind": kind})
    return [len(c) + Path(i[0]).stat().st_size % 7 for c, i in zip(completions, images)]


def longer(prompts, first, second, images):
    """A pairwise judge: P(first better) = 1 if it is longer, 0 if shorter, 1/2 on equal lengths."""
    assert all(Path(p).is_file() for item in images for p in item)
    return [0.5 + 0.5 * ((len(a) > len(b)) - (len(a) < len(b))) for a, b in zip(first, second)]


def blind(prompts, completions):
    """A reward that takes no images."""
    return [float(len(c)) for c in completions]
