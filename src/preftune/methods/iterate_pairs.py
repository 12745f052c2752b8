"""Iterative DPO's pairs (:mod:`preftune.methods.iterate`): preference rows from one prompt's judged
samples, and the Borda scores a pairwise judge gives them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.data.rows import Prompt, as_prompt
from preftune.rewards.judges import PairwiseJudge, call_pairwise


# -- pairs from judged samples ---------------------------------------------------------------------
@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    ties: int = 0  # prompts (best_worst) or sample pairs (all_pairs) without a clear winner
    identical: int = 0


def build_pairs(prompt: str | Prompt, texts: list[str], scores: list[float], strategy: str, min_gap: float,
                stats: PairStats) -> list[dict[str, Any]]:
    """Preference rows ``{prompt, chosen, rejected, chosen_score, rejected_score}`` (and the prompt's
    ``images``, as absolute paths or data URIs) from one prompt's judged samples. ``best_worst``: the
    best sample vs the worst one with a different text (first on ties) when their gap > min_gap;
    ``all_pairs``: every (i, j) with s_i - s_j > min_gap. Equal scores (gap <= min_gap) are ties,
    equal texts are dropped; both are counted."""
    stats.prompts += 1
    if strategy == "best_worst":
        hi = max(range(len(scores)), key=lambda i: (scores[i], -i))
        others = [i for i in range(len(texts)) if texts[i] != texts[hi]]  # the worst *different* text
        if not others:
            stats.identical += 1
            return []
        candidates = [(hi, min(others, key=lambda i: (scores[i], i)))]
    else:
        candidates = [(i, j) for i in range(len(texts)) for j in range(len(texts))
                      if i != j and scores[i] >= scores[j]]
    prompt = as_prompt(prompt)
    images = prompt.images_field()
    rows = []
    for i, j in candidates:
        if scores[i] - scores[j] <= min_gap:
            if strategy == "best_worst" or scores[i] > scores[j] or i < j:  # each unordered tie once
                stats.ties += 1
            continue
        if texts[i] == texts[j]:
            stats.identical += 1
            continue
        rows.append({"prompt": prompt.text, **images, "chosen": texts[i], "rejected": texts[j],
                     "chosen_score": scores[i], "rejected_score": scores[j]})
    stats.pairs += len(rows)
    return rows


def borda_scores(judge: PairwiseJudge, prompt: str | Prompt, texts: list[str]) -> list[float]:
    """Mean probability that sample i beats each other sample (both orders judged, averaged)."""
    k = len(texts)
    order = [(i, j) for i in range(k) for j in range(k) if i != j]
    probs = call_pairwise(judge, [prompt] * len(order), [texts[i] for i, _ in order],
                          [texts[j] for _, j in order], what="config: pairwise_judge")
    wins = [0.0] * k
    for (i, j), p in zip(order, probs):
        wins[i] += float(p) / 2
        wins[j] += (1.0 - float(p)) / 2
    return [w / (k - 1) for w in wins]
