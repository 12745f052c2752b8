"""Judges: who says which completion is better, for PPO, iterative DPO and evaluation.

* a reward (pointwise): ``reward(prompts, completions) -> [n]`` floats, from
  - ``"sentiment"``: VADER sentiment of the completion (the lab's ground truth r*),
  - a ``preftune reward`` model directory (scored as ``preftune.score`` scores), or
  - ``"package.module:function"``: any importable Python function of that signature;
* a pairwise judge: ``judge(prompts, first, second) -> [n]`` probabilities that ``first`` is better,
  from ``"package.module:function"``, or from a reward through the Bradley-Terry link
  ``P(a > b) = sigmoid((r(a) - r(b)) / T)`` (T = 0: 1, 0 or 1/2 on a tie).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from preftune.rewards.annotator import bradley_terry_probability, sentiment_reward

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]
PairwiseJudge = Callable[[list[str], list[str], list[str]], Sequence[float]]

__all__ = ["PairwiseJudge", "RewardFunction", "check_reward_spec", "import_function", "load_pairwise_judge",
           "load_reward", "pairwise_from_reward", "sentiment"]


def sentiment(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The lab's ground truth as a reward: VADER sentiment of each completion (prompts ignored)."""
    return sentiment_reward(completions)


def import_function(spec: str, what: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function; a clear error naming ``what`` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{what}: expected 'sentiment', a reward model directory or "
                         f"'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what}: {spec!r} cannot be imported ({e})") from None
    if not callable(fn):
        raise ValueError(f"{what}: {spec!r} is not callable")
    return fn


def load_reward(spec: str, *, what: str = "reward", device: Any = None, max_length: int | None = 1024,
                max_prompt_length: int | None = 512) -> RewardFunction:
    """A pointwise reward from its name (see the module docstring)."""
    if spec == "sentiment":
        return sentiment
    check_reward_spec(spec, what)
    if os.path.isdir(spec):
        from preftune.model.load import load_tokenizer
        from preftune.rewards.reward_model import load_reward_model, score

        tokenizer = load_tokenizer(spec)
        model = load_reward_model(spec, pad_token_id=tokenizer.pad_token_id).eval()
        if device is not None:
            model = model.to(device)
        return lambda prompts, completions: score(model, prompts, completions, tokenizer=tokenizer,
                                                  max_length=max_length, max_prompt_length=max_prompt_length)
    return import_function(spec, what)


def check_reward_spec(spec: str, what: str, *, trust_remote_code: bool = False) -> None:
    """Before anything loads: a reward spec naming a directory must be a usable reward model directory
    (config, safetensors weights, tokenizer: :func:`~preftune.model.load.check_model_path`), one that
    looks like a path must exist; one line naming ``what``. Functions are imported only when loaded."""
    if spec == "sentiment":
        return
    if os.path.isdir(spec):
        from preftune.model.hub import check_model_path

        check_model_path(what, spec, with_tokenizer=True, trust_remote_code=trust_remote_code, label=what)
    elif ":" not in spec and ("/" in spec or spec.startswith(".")):
        raise FileNotFoundError(f"{what}: no reward model directory at {spec!r}")


def pairwise_from_reward(reward: RewardFunction, temperature: float = 0.0) -> PairwiseJudge:
    """A pairwise judge from a reward: P(first > second) = sigmoid((r1 - r2) / T)."""

    def judge(prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        r1, r2 = reward(prompts, first), reward(prompts, second)
        return [bradley_terry_probability(a, b, temperature) for a, b in zip(r1, r2)]

    return judge


def load_pairwise_judge(spec: str, *, what: str = "judge") -> PairwiseJudge:
    """``"package.module:function"`` taking (prompts, first, second) -> P(first better)."""
    return import_function(spec, what)
