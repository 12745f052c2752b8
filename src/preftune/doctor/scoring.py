"""Score margins of pairs with a model: m = score(chosen) - score(rejected), in the label's direction.

* A causal LM (a DPO policy) scores with its implicit reward against a reference (default: the
  embedded model, or whatever ``--reference`` names):
      m = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))],
  tokenized and batched as in training (:class:`PairTokenizer`, :func:`collate`,
  :class:`SequenceScorer`); a pair whose replies are identical after truncation gets NaN.
* A reward model (``preftune reward`` output, an ``*ForSequenceClassification`` directory) scores
  with :func:`preftune.methods.reward.score`: m = r(x, y_w) - r(x, y_l).

sigmoid(m) is then the model's P(chosen beats rejected) under Bradley-Terry.
torch and transformers are imported here only, when a model is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.formats import PreferencePair
from preftune.data.tokenize import Budgets


def model_kind(name: str) -> str:
    """'reward_model' for a sequence-classification directory, else 'policy' (a causal LM)."""
    config = Path(name) / "config.json"
    if name not in ("", "embedded") and not Path(name).exists():
        raise FileNotFoundError(f"model {name!r}: no such directory")
    if config.is_file():
        archs = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "reward_model"
    return "policy"


@dataclass
class PairScorer:
    """``margins(pairs) -> [n]`` float array (see the module docstring)."""

    model: str
    kind: str
    tokenizer: Any
    budgets: Budgets
    beta: float = 0.1
    reference: str | None = None
    batch_size: int = 16
    _policy: Any = None
    _reference: Any = None
    images: Any = None  # the policy's ImageInputs (image-text models), else None

    @classmethod
    def load(
        cls,
        model: str,
        *,
        reference: str | None = None,
        beta: float = 0.1,
        budgets: Budgets | None = None,
        batch_size: int = 16,
    ) -> PairScorer:
        from preftune.model.load import load_model, load_tokenizer
        from preftune.model.logps import SequenceScorer
        from preftune.rewards.reward_model import load_reward_model

        kind = model_kind(model)
        tokenizer = load_tokenizer(model)
        scorer = cls(model, kind, tokenizer, budgets or Budgets(), beta, reference, batch_size)
        if kind == "reward_model":
            if reference is not None:
                raise ValueError(f"--reference is for DPO policies; {model} is a reward model")
            scorer._policy = load_reward_model(model, pad_token_id=tokenizer.pad_token_id).eval()
        else:
            from preftune.model.vision import load_image_inputs

            scorer.images = load_image_inputs(model, tokenizer)
            scorer._policy = SequenceScorer(load_model(model)).eval()
            scorer._reference = SequenceScorer(load_model(reference or "embedded")).eval()
        return scorer

    @property
    def description(self) -> str:
        if self.kind == "reward_model":
            return f"reward model {self.model}: m = r(x, y_w) - r(x, y_l)"
        return (
            f"implicit reward of {self.model} against {self.reference or 'embedded'}: "
            f"m = {self.beta:g} * (log-ratio of chosen - log-ratio of rejected)"
        )

    def margins(self, pairs: Sequence[PreferencePair]) -> np.ndarray:
        import torch

        if not pairs:
            return np.zeros(0)
        with torch.no_grad():
            if self.kind == "reward_model":
                return self._reward_margins(pairs)
            return self._implicit_margins(pairs)

    def _reward_margins(self, pairs: Sequence[PreferencePair]) -> np.ndarray:
        from preftune.rewards.reward_model import score

        b = self.budgets
        kwargs = {
            "tokenizer": self.tokenizer,
            "batch_size": self.batch_size,
            "max_length": b.max_length,
            "max_prompt_length": b.max_prompt_length,
        }
        prompts = [p.prompt for p in pairs]
        chosen = score(self._policy, prompts, [p.chosen for p in pairs], **kwargs)
        rejected = score(self._policy, prompts, [p.rejected for p in pairs], **kwargs)
        return np.array(chosen) - np.array(rejected)

    def _implicit_margins(self, pairs: Sequence[PreferencePair]) -> np.ndarray:
        from preftune.data.batching import collate
        from preftune.data.tokenize import PairTokenizer

        # numbered origins: tokenize() drops identical pairs, the numbers say which ones remain
        data = PairTokenizer(self.tokenizer, self.budgets, self.images).tokenize(
            [replace(p, origin=str(k)) for k, p in enumerate(pairs)]
        )
        out = np.full(len(pairs), np.nan)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(data.pairs), self.batch_size):
            chunk = data.pairs[start : start + self.batch_size]
            batch = collate(chunk, pad_id=pad, images=self.images)
            pol, ref = self._policy(batch), self._reference(batch)
            m = self.beta * ((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected))
            for tp, value in zip(chunk, m.tolist()):
                out[int(tp.origin)] = value
        return out
