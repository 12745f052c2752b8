"""The simulated annotator: VADER ground truth and Bradley-Terry labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preftune.rewards.annotator import (
    annotate,
    bradley_terry_probability,
    label_pairs,
    read_pairs_jsonl,
    sentiment_reward,
    write_pairs_jsonl,
)


def test_vader_scores_sentiment_sign():
    happy, sad, plain = sentiment_reward([
        "She was so happy and loved the beautiful flowers. It was a wonderful day!",
        "He was sad and scared, and the angry dog hurt him.",
        "The box is on the table.",
    ])
    assert happy > 0.5
    assert sad < -0.5
    assert plain == 0.0


def test_zero_temperature_always_picks_the_higher_reward():
    rng = np.random.default_rng(0)
    first = rng.uniform(-1, 1, 2000)
    second = first + rng.choice([-1, 1], 2000) * rng.uniform(1e-6, 1, 2000)  # never equal
    wins = label_pairs(first, second, 0.0, np.random.default_rng(1))
    assert wins == [bool(a > b) for a, b in zip(first, second)]
    # a tiny positive T behaves the same for differences far above it
    wins = label_pairs(first, second, 1e-9, np.random.default_rng(2))
    assert wins == [bool(a > b) for a, b in zip(first, second)]


def test_zero_temperature_ties_are_a_fair_coin():
    assert bradley_terry_probability(0.3, 0.3, 0.0) == 0.5
    wins = label_pairs([0.2] * 4000, [0.2] * 4000, 0.0, np.random.default_rng(0))
    assert abs(np.mean(wins) - 0.5) < 4 * 0.5 / math.sqrt(4000)  # 4 standard errors


def test_probability_is_the_bradley_terry_sigmoid():
    assert bradley_terry_probability(0.5, 0.1, 0.2) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert bradley_terry_probability(0.1, 0.5, 0.2) == pytest.approx(1 / (1 + math.exp(2.0)))
    assert bradley_terry_probability(1.0, -1.0, 1e-4) == 1.0  # no overflow for huge (r1 - r2) / T
    assert bradley_terry_probability(-1.0, 1.0, 1e-4) == 0.0
    with pytest.raises(ValueError):
        bradley_terry_probability(0.0, 1.0, -1.0)


def test_large_temperature_approaches_a_fair_coin():
    n = 20_000
    first, second = [1.0] * n, [-1.0] * n  # the largest possible reward gap
    rates = {t: float(np.mean(label_pairs(first, second, t, np.random.default_rng(3))))
             for t in (0.5, 10.0, 1e4)}
    se = 0.5 / math.sqrt(n)
    assert rates[0.5] == pytest.approx(1 / (1 + math.exp(-4.0)), abs=4 * se)  # ~0.982
    assert rates[10.0] == pytest.approx(1 / (1 + math.exp(-0.2)), abs=4 * se)  # ~0.550
    assert abs(rates[1e4] - 0.5) < 4 * se
    assert rates[0.5] > rates[10.0] > rates[1e4]


def test_labels_are_reproducible_and_written_in_the_standard_format(tmp_path):
    prompts = ["Once upon a time,"] * 3
    good = [" they were happy and laughed.", " the sun was warm and lovely.", " she loved her kind friend."]
    bad = [" he cried, sad and hurt.", " the storm was scary and bad.", " it broke and he was angry."]
    first = annotate(prompts, bad, good, 0.0, np.random.default_rng(7))
    assert first == annotate(prompts, bad, good, 0.0, np.random.default_rng(7))
    assert [p.chosen for p in first] == good and [p.rejected for p in first] == bad
    path = write_pairs_jsonl(first, tmp_path / "pairs.jsonl")
    assert read_pairs_jsonl(path) == first

    from preftune.data.formats import load_preference_data

    loaded = load_preference_data(path).pairs
    assert ([(p.prompt, p.chosen, p.rejected) for p in loaded]
            == [(p.prompt, p.chosen, p.rejected) for p in first])
