"""The settings of ``preftune eval`` (:mod:`preftune.eval.evaluate`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("preftune")

@dataclass
class EvalConfig:
    """Settings of an evaluation (each is a ``preftune eval`` flag or a key of its YAML ``--config``).

    models: directories to evaluate (causal LMs; reward models get the pair accuracy only).
    baseline: the causal LM every model is compared with ("embedded" = the bundled stories260K).
    reference: pi_ref of the KL and the implicit reward (default: the baseline).
    prompts: a file of rows with ``prompt`` (or preference rows); default: the prompts of ``pairs``,
      else ``num_prompts`` held-out TinyStories openings (the demo's held-out set for the same seed).
    judge: a reward: "sentiment", a reward-model directory, "module:function" (prompts, completions)
      -> floats, or such a callable; None: no reward judge.
    pairwise_judge: "module:function" (prompts, first, second) -> P(first better), or a callable.
      The leaderboard and the headline use it when given, else the reward judge.
    """

    models: list[str] = field(default_factory=list)
    baseline: str = "embedded"
    reference: str | None = None
    beta: float = 0.1
    prompts: str | None = None
    pairs: str | None = None
    num_prompts: int | None = None
    judge: str | Callable[..., Sequence[float]] | None = "sentiment"
    pairwise_judge: str | Callable[..., Sequence[float]] | None = None
    num_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    level: float = 0.95
    bootstrap: int = 2000
    bt_prior: float = 0.0
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    batch_size: int = 64
    output_dir: str = "runs/eval"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    skip_bad_rows: bool = False  # of prompts and pairs: count and skip malformed rows instead of stopping

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            self.models = [self.models]
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("eval: models must name at least one model directory")
        if self.judge in ("none", ""):
            self.judge = None
        # name: (integer?, test, what it must be); None is allowed for the optional ones
        numbers = {"beta": (False, lambda v: v > 0, "> 0"), "num_prompts": (True, lambda v: v >= 1, ">= 1"),
                   "num_samples": (True, lambda v: v >= 1, ">= 1"),
                   "temperature": (False, lambda v: v > 0, "> 0"),
                   "max_new_tokens": (True, lambda v: v >= 1, ">= 1"),
                   "level": (False, lambda v: 0 < v < 1, "in (0, 1)"),
                   "bootstrap": (True, lambda v: v >= 1, ">= 1"),
                   "bt_prior": (False, lambda v: v >= 0, ">= 0"),
                   "batch_size": (True, lambda v: v >= 1, ">= 1"),
                   "seed": (True, lambda v: True, "an integer"),
                   "threads": (True, lambda v: v >= 1, ">= 1"),
                   "max_length": (True, lambda v: v >= 2, ">= 2"),
                   "max_prompt_length": (True, lambda v: v >= 1, ">= 1")}
        optional = ("num_prompts", "threads", "max_length", "max_prompt_length")
        for name, (integer, test, what) in numbers.items():
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            number = isinstance(value, int if integer else int | float) and not isinstance(value, bool)
            if not number or not test(value):
                raise ValueError(f"eval: {name} must be {'an integer' if integer else 'a number'} {what}, "
                                 f"got {value!r}")
        if self.max_length is not None and self.max_prompt_length is not None and \
                self.max_prompt_length >= self.max_length:
            if self.max_prompt_length != EvalConfig.__dataclass_fields__["max_prompt_length"].default:
                raise ValueError(f"eval: max_prompt_length ({self.max_prompt_length}) must be < max_length "
                                 f"({self.max_length})")
            # the default follows a smaller max_length the user set
            logger.info("eval: max_prompt_length %d: half of max_length %d (the default %d does not fit "
                        "in it)", max(1, self.max_length // 2), self.max_length, self.max_prompt_length)
            self.max_prompt_length = max(1, self.max_length // 2)
        for name in ("prompts", "pairs"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"eval: {name}: no such file {path!r}")
        for path in [*self.models, self.baseline, self.reference]:
            if path not in (None, "embedded") and not os.path.isdir(path):
                raise FileNotFoundError(f"eval: no model directory at {path!r}")

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-ready values (callables by name)."""
        out = dataclasses.asdict(self)
        for key in ("judge", "pairwise_judge"):
            if callable(out[key]):
                out[key] = getattr(out[key], "__qualname__", repr(out[key]))
        return out
