"""A model's samples on a prompt set, scored by a reward: the policy side of an evaluation
(:func:`~preftune.model.generation.sample_continuations`) joined with a judge
(:func:`~preftune.rewards.judges.call_reward`, which passes the prompts' images and columns)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from preftune.data.images import ImageInputs
from preftune.data.rows import Prompt
from preftune.model.generation import Sample, sample_continuations
from preftune.rewards.judges import call_reward

__all__ = ["ScoredSamples", "sample_and_score"]


@dataclass(frozen=True)
class ScoredSamples:
    """Samples of one model on a prompt set (flat, prompt-major: ``num_samples`` per prompt) and
    their rewards under a judge."""

    samples: list[Sample]
    rewards: list[float]
    num_samples: int

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.samples)


def sample_and_score(model: nn.Module, tokenizer: Any, prompts: Sequence[str | Prompt], reward: Any, *,
                     num_samples: int, temperature: float, max_new_tokens: int, seed: int,
                     max_prompt_tokens: int | None = None, images: ImageInputs | None = None,
                     what: str = "judge") -> ScoredSamples:
    """``num_samples`` continuations per prompt (seeded as :func:`sample_continuations`), scored
    by ``reward(prompts, completions, **columns) -> list[float]`` (a
    :data:`preftune.rewards.judges.RewardFunction`)."""
    groups = sample_continuations(model, tokenizer, prompts, num_samples=num_samples,
                                  temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                  max_prompt_tokens=max_prompt_tokens, images=images)
    flat = [s for group in groups for s in group]
    per_sample = [p for p in prompts for _ in range(num_samples)]
    rewards = call_reward(reward, per_sample, [s.text for s in flat], what=what)
    return ScoredSamples(flat, rewards, num_samples)
