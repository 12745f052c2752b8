"""A simulated annotator: a known ground-truth reward and Bradley-Terry labels drawn from it.

Ground truth: r*(x, y) = VADER compound sentiment of the continuation y (Hutto & Gilbert 2014),
a number in [-1, 1]; the prompt x is ignored. ``vaderSentiment`` ships its lexicon, so this runs
offline and is deterministic.

Labels: for two continuations y1, y2 of the same prompt the annotator prefers y1 with the
Bradley-Terry probability

    P(y1 > y2 | x) = sigmoid((r*(x, y1) - r*(x, y2)) / T),

T > 0 the annotator's temperature (noise). T = 0 is the noiseless limit, handled exactly: the
higher reward always wins and a tie is a fair coin. As T -> inf every label is a fair coin.
Draws use a seeded ``numpy`` generator: ``y1`` wins iff u < P with u ~ U[0, 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "LabelledPair",
    "bradley_terry_probability",
    "label_pairs",
    "read_pairs_jsonl",
    "sentiment_reward",
    "write_pairs_jsonl",
]


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_reward(texts: Iterable[str]) -> list[float]:
    """r*(y) = VADER compound score of each text, in [-1, 1] (0 for text without sentiment)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def bradley_terry_probability(r1: float, r2: float, temperature: float) -> float:
    """P(first beats second) = sigmoid((r1 - r2) / T); at T = 0: 1, 0, or 1/2 on a tie."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    diff = r1 - r2
    if temperature == 0 or diff == 0:
        return 0.5 if diff == 0 else float(diff > 0)
    z = diff / temperature
    # numerically stable logistic for any z
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def label_pairs(
    first: Sequence[float], second: Sequence[float], temperature: float, rng: np.random.Generator
) -> list[bool]:
    """One Bradley-Terry draw per pair: True where the first item is preferred."""
    if len(first) != len(second):
        raise ValueError(f"need as many first as second rewards, got {len(first)} and {len(second)}")
    draws = rng.random(len(first))
    return [bool(u < bradley_terry_probability(a, b, temperature)) for u, a, b in zip(draws, first, second)]


@dataclass(frozen=True)
class LabelledPair:
    """One annotated pair in the standard format, with the rewards the annotator saw."""

    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float


def annotate(
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    temperature: float,
    rng: np.random.Generator,
) -> list[LabelledPair]:
    """Score two continuations per prompt with r*, draw the winner, return the labelled pairs."""
    r1, r2 = sentiment_reward(first), sentiment_reward(second)
    wins = label_pairs(r1, r2, temperature, rng)
    return [
        LabelledPair(p, a, b, ra, rb) if w else LabelledPair(p, b, a, rb, ra)
        for p, a, b, ra, rb, w in zip(prompts, first, second, r1, r2, wins)
    ]


def write_pairs_jsonl(pairs: Iterable[LabelledPair], path: str | Path) -> Path:
    """Write ``{prompt, chosen, rejected, chosen_reward, rejected_reward}`` rows (extra keys are ignored
    by the loader)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")
    return path


def read_pairs_jsonl(path: str | Path) -> list[LabelledPair]:
    with open(path, encoding="utf-8") as f:
        return [LabelledPair(**json.loads(line)) for line in f if line.strip()]
