"""Story openings from TinyStories (bundled, CDLA-Sharing-1.0) as prompts, split train / held-out."""

from __future__ import annotations

import random
import re
from pathlib import Path

__all__ = ["OPENINGS_FILE", "load_openings", "opening", "split_prompts"]

OPENINGS_FILE = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "tinystories_openings.txt"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def opening(text: str, sentences: int = 2) -> str:
    """The first ``sentences`` sentences of a story (split after ``.``, ``!``, ``?`` + space)."""
    return " ".join(_SENTENCE_END.split(" ".join(text.split()))[:sentences])


def load_openings(path: str | Path | None = None, *, sentences: int = 2) -> list[str]:
    """Distinct openings in file order; ``#`` lines are notices, blank lines are skipped."""
    lines = Path(path or OPENINGS_FILE).read_text(encoding="utf-8").splitlines()
    seen: dict[str, None] = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            seen.setdefault(opening(line, sentences))
    return list(seen)


def split_prompts(openings: list[str], num_train: int, num_eval: int,
                  seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle; the first ``num_eval`` are held out, the next ``num_train`` train. The held-out
    set depends on the seed only, not on ``num_train``, and never overlaps the training prompts."""
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"need at least one train and one held-out prompt, got {num_train} and {num_eval}")
    if num_train + num_eval > len(openings):
        raise ValueError(f"asked for {num_train} train + {num_eval} held-out prompts, "
                         f"but only {len(openings)} distinct openings exist")
    order = list(openings)
    random.Random(seed).shuffle(order)
    return order[num_eval : num_eval + num_train], order[:num_eval]
