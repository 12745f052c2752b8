"""Scoring helpers of ``preftune eval`` (:mod:`preftune.eval.evaluate`): preference accuracy, pair
log-probabilities, reward-model accuracy and the judges."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from preftune.eval.eval_report import PreferenceAccuracy
from preftune.eval.winrate import swapped_preferences

if TYPE_CHECKING:
    from preftune.eval.config import EvalConfig


def preference_accuracy(margins: Sequence[float], preferences: Sequence[float]) -> tuple[float, float]:
    """acc = mean_i [p_i h(m_i) + (1 - p_i) h(-m_i)], h(m) = 1[m > 0] + 1/2 1[m = 0], and its standard
    error sqrt(acc (1 - acc) / n)."""
    m, p = np.asarray(margins, dtype=float), np.asarray(preferences, dtype=float)
    h = (m > 0) + 0.5 * (m == 0)
    acc = float((p * h + (1.0 - p) * (1.0 - h)).mean())
    return acc, math.sqrt(max(acc * (1.0 - acc), 0.0) / m.size)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error (:func:`preftune.stats.mean_stderr`)."""
    from preftune.stats import mean_stderr

    return mean_stderr(values)


def accuracy_from_rewards(source: str, chosen: np.ndarray, rejected: np.ndarray, preferences: Sequence[float],
                          dropped: int = 0) -> PreferenceAccuracy:
    """Accuracy and mean margin m_i = r(y_w) - r(y_l) of ``[n]`` rewards ``chosen`` and ``rejected``
    (:func:`preference_accuracy`); ``dropped`` pairs were left out before scoring."""
    margin = chosen - rejected
    acc, se = preference_accuracy(margin, preferences)
    margin_mean, margin_se = mean_se(margin)
    return PreferenceAccuracy(source, acc, se, margin_mean, margin_se, float(chosen.mean()),
                              float(rejected.mean()), int(margin.size), dropped)


class Judges:
    """The reward judge and the pairwise judge of a run, loaded from their specs."""

    def __init__(self, config: EvalConfig, device: Any):
        from preftune.rewards.judges import load_pairwise_judge, load_reward

        def label(spec: Any) -> str:
            return spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))

        self.reward = self.pairwise = None
        self.reward_label = self.pairwise_label = None
        if config.judge is not None:
            self.reward = config.judge if callable(config.judge) else load_reward(config.judge, what="judge",
                                                                                  device=device)
            self.reward_label = label(config.judge)
        if config.pairwise_judge is not None:
            spec = config.pairwise_judge
            self.pairwise = spec if callable(spec) else load_pairwise_judge(spec, what="pairwise_judge")
            self.pairwise_label = label(spec)
            if self.pairwise_label == self.reward_label:
                self.pairwise_label += " (pairwise)"

    def check_takes_images(self) -> None:
        """For prompts with images: each judge takes them (one line otherwise)."""
        from preftune.rewards.judges import check_takes_images

        if self.reward is not None:
            check_takes_images(self.reward, f"judge {self.reward_label!r}")
        if self.pairwise is not None:
            check_takes_images(self.pairwise, f"pairwise_judge {self.pairwise_label!r}", positional=3)

    def rewards(self, prompts: Sequence[Any], completions: list[str]) -> np.ndarray:
        """``[n]`` rewards of the reward judge (prompts: texts or :class:`~preftune.data.rows.Prompt`,
        whose images and columns the judge may take)."""
        from preftune.rewards.judges import call_reward

        return np.array(call_reward(self.reward, prompts, completions, what=f"judge {self.reward_label!r}"))

    def pairwise_preferences(self, prompts: Sequence[Any], a: list[str], b: list[str]):
        """Both orders of the pairwise judge, combined
        (:func:`~preftune.eval.winrate.swapped_preferences`)."""
        from preftune.rewards.judges import call_pairwise

        what = f"pairwise_judge {self.pairwise_label!r}"
        p_ab = call_pairwise(self.pairwise, prompts, a, b, what=what)
        p_ba = call_pairwise(self.pairwise, prompts, b, a, what=what)
        return swapped_preferences(p_ab, p_ba)


def same_vocab(a: Any, b: Any) -> bool:
    """Whether tokenizers ``a`` and ``b`` map the same strings to the same ids."""
    return a.get_vocab() == b.get_vocab()


PAIR_BATCH = 8  # pairs per scoring pass: a prefix-shared batch's attention mask grows as (rows x length^2)


def pair_logps(model: Any, pairs: Sequence[Any], batch_size: int,
               images: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``[n]`` log pi(y_w|x), ``[n]`` log pi(y_l|x) of tokenized pairs (one forward per batch);
    ``images``: the model's :class:`~preftune.data.images.ImageInputs`, for pairs with images."""
    import torch

    from preftune.data.batching import collate
    from preftune.model.logps import SequenceScorer

    scorer, device = SequenceScorer(model).eval(), next(model.parameters()).device
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            out = scorer(collate(pairs[start : start + batch_size], layout="prefix_shared",
                                 images=images).to(device))
            chosen.append(out.chosen.double().cpu().numpy())
            rejected.append(out.rejected.double().cpu().numpy())
    return np.concatenate(chosen), np.concatenate(rejected)


REWARD_CHUNK = 1024  # pairs scored by a reward model per read of the pairs file


def reward_model_accuracy(path: str, config: EvalConfig, device: Any) -> PreferenceAccuracy:
    """Accuracy and margin of a reward model's r(x, y_w) - r(x, y_l) on ``config.pairs``, read and
    scored ``REWARD_CHUNK`` pairs at a time (only the rewards are kept)."""
    from preftune.eval.inputs import iter_pair_chunks
    from preftune.model.load import load_tokenizer
    from preftune.rewards.reward_model import load_reward_model, score

    tokenizer = load_tokenizer(path)
    model = load_reward_model(path, pad_token_id=tokenizer.pad_token_id).to(device).eval()
    kwargs = dict(tokenizer=tokenizer, max_length=config.max_length,
                  max_prompt_length=config.max_prompt_length)
    chosen: list[float] = []
    rejected: list[float] = []
    preferences: list[float] = []
    for pairs in iter_pair_chunks(config, tokenizer, REWARD_CHUNK):
        prompts = [p.prompt for p in pairs]
        chosen += score(model, prompts, [p.chosen for p in pairs], **kwargs)
        rejected += score(model, prompts, [p.rejected for p in pairs], **kwargs)
        preferences += [p.preference for p in pairs]
    return accuracy_from_rewards("reward model", np.array(chosen), np.array(rejected), preferences)
