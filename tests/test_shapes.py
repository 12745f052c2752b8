"""The vision lab's synthetic data: deterministic images, non-overlapping recognisable shapes, balanced
examples, exact-word grading, and the JSONL + PNG dataset layout the trainer reads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preftune.lab.shapes import (
    ANSWERS,
    COLOURS,
    COUNT_WORDS,
    KINDS,
    PALETTE,
    QUESTIONS,
    SHAPES,
    ShapeScene,
    VisionExample,
    example,
    grade,
    layout,
    make_examples,
    png_bytes,
    render_image,
    shape_mask,
    write_dataset,
)


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of the True pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            n += 1
            stack = [(y0, x0)]
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
    return n


def test_render_is_deterministic_and_seeded():
    scene = ShapeScene("red", "circle", 2, 17)
    a, b = render_image(scene), render_image(ShapeScene("red", "circle", 2, 17))
    assert a.mode == "RGB" and a.size == (32, 32)
    assert a.tobytes() == b.tobytes()
    assert png_bytes(scene) == png_bytes(scene)
    assert render_image(ShapeScene("red", "circle", 2, 18)).tobytes() != a.tobytes()
    assert render_image(scene, size=48).size == (48, 48)


@pytest.mark.parametrize("shape", SHAPES)
def test_three_shapes_fit_without_overlap(shape):
    for seed in range(40):
        scene = ShapeScene(COLOURS[seed % 4], shape, 3, seed)
        boxes = layout(scene)
        assert len(boxes) == 3
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 <= x1 < 32 and 0 <= y0 <= y1 < 32
            assert 8 <= x1 - x0 + 1 <= 12 and x1 - x0 == y1 - y0
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (scene, a, b)
        mask = np.asarray(shape_mask(scene)) > 0
        assert _components(mask) == 3, scene  # the shapes never touch, so they can be counted


def test_count_matches_components_and_sizes():
    for count in (1, 2, 3):
        for seed in range(10):
            scene = ShapeScene("blue", "square", count, seed)
            assert _components(np.asarray(shape_mask(scene)) > 0) == count
            for x0, _, x1, _ in layout(scene):
                assert 8 <= x1 - x0 + 1 <= 12


@pytest.mark.parametrize("colour", COLOURS)
def test_shape_colour_dominates_its_pixels(colour):
    for shape in SHAPES:
        scene = ShapeScene(colour, shape, 1 + SHAPES.index(shape), 5)
        pixels = np.asarray(render_image(scene)).astype(float)
        mask = np.asarray(shape_mask(scene)) > 0
        assert mask.sum() >= 30  # a real shape, not a speck
        inside, outside = pixels[mask].mean(axis=0), pixels[~mask].mean(axis=0)
        nearest = min(PALETTE, key=lambda c: np.abs(np.array(PALETTE[c]) - inside).sum())
        assert nearest == colour
        assert np.abs(inside - np.array(PALETTE[colour])).max() <= 16
        assert np.ptp(outside) < 3  # the background is grey
        assert np.abs(pixels[~mask] - outside).max() <= 13  # low-amplitude noise
        assert np.abs(inside - outside).max() > 60  # the colour stands out from the background


def test_make_examples_is_balanced_and_deterministic():
    examples = make_examples(360, seed=3)
    assert examples == make_examples(360, seed=3)
    assert examples != make_examples(360, seed=4)
    kinds = Counter(ex.kind for ex in examples)
    assert kinds == {kind: 120 for kind in KINDS}
    for kind in KINDS:
        answers = Counter(ex.answer for ex in examples if ex.kind == kind)
        assert answers == {a: 120 // len(ANSWERS[kind]) for a in ANSWERS[kind]}
    for ex in examples:
        assert ex.question == QUESTIONS[ex.kind]
        assert ex.answer == ex.scene.answer(ex.kind)
        assert ex.answer == ex.answer.lower() and " " not in ex.answer
    # Any prefix is balanced within one per kind and, within a kind, per answer.
    prefix = make_examples(37, seed=3)
    assert prefix == examples[:37]
    assert (
        max(Counter(ex.kind for ex in prefix).values()) - min(Counter(ex.kind for ex in prefix).values()) <= 1
    )
    colour_answers = Counter(ex.answer for ex in prefix if ex.kind == "colour")
    assert max(colour_answers.values()) - min(colour_answers[c] for c in COLOURS) <= 1
    assert make_examples(0, seed=1) == []


def test_grade_takes_the_exact_first_word():
    red = example(ShapeScene("red", "circle", 2, 1), "colour")
    assert grade(red, "Red.")
    assert grade(red, "red circle")
    assert grade(red, "  RED, I think")
    assert grade(red, '"red"')
    assert not grade(red, "blue")
    assert not grade(red, "reddish")
    assert not grade(red, "It is red")
    assert not grade(red, "grey")
    assert not grade(red, "")
    two = example(ShapeScene("red", "circle", 2, 1), "count")
    assert two.answer == COUNT_WORDS[2] == "two"
    assert grade(two, "Two!") and not grade(two, "2")
    assert grade(example(ShapeScene("green", "triangle", 1, 1), "shape"), "Triangle")


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError):
        ShapeScene("grey", "circle", 1, 0)
    with pytest.raises(ValueError):
        ShapeScene("red", "star", 1, 0)
    with pytest.raises(ValueError):
        ShapeScene("red", "circle", 4, 0)
    with pytest.raises(ValueError):
        VisionExample(ShapeScene("red", "circle", 1, 0), "colour", QUESTIONS["colour"], "blue")


def _check_user_turn(turn: dict, question: str) -> None:
    assert turn["role"] == "user"
    assert turn["content"] == [{"type": "image"}, {"type": "text", "text": question}]


def test_write_dataset_sft_and_prompts(tmp_path: Path):
    scene = ShapeScene("red", "circle", 2, 17)
    shared = [example(scene, kind) for kind in KINDS]  # three examples, one scene
    examples = shared + make_examples(9, seed=0)
    sft = write_dataset(examples, tmp_path / "data", name="train", kind="sft")
    assert sft == tmp_path / "data" / "train.jsonl"
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert len(rows) == len(examples)
    assert rows[0]["images"] == ["images/red-circle-2-s17.png"]
    for row, ex in zip(rows, examples):
        assert set(row) == {"messages", "images"}
        user, assistant = row["messages"]
        _check_user_turn(user, ex.question)
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}
        (image,) = row["images"]
        with Image.open(sft.parent / image) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            assert im.tobytes() == render_image(ex.scene).tobytes()
    pngs = sorted(p.name for p in (tmp_path / "data" / "images").iterdir())
    assert pngs == sorted({ex.scene.filename for ex in examples})  # once per scene, no temp files left

    prompts = write_dataset(examples[3:], tmp_path / "data", name="heldout", kind="prompts")
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(rows) == len(examples) - 3
    for row, ex in zip(rows, examples[3:]):
        assert set(row) == {"prompt", "images", "answer", "kind"}
        (user,) = row["prompt"]
        _check_user_turn(user, ex.question)
        assert row["answer"] == ex.answer and row["kind"] == ex.kind
        assert (prompts.parent / row["images"][0]).is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["heldout.jsonl", "images", "train.jsonl"]

    with pytest.raises(ValueError):
        write_dataset(examples, tmp_path, name="x", kind="dpo")
    with pytest.raises(ValueError):
        write_dataset(examples, tmp_path, name="../x", kind="sft")
