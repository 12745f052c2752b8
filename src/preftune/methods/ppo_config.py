"""The settings of a PPO run (:mod:`preftune.methods.ppo`), read by the rollouts beside it
(:mod:`preftune.methods.ppo_rollout`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from preftune.engine.config import TrainConfig, check_ranges
from preftune.losses.ppo import KL_ESTIMATORS


@dataclass
class PPOConfig(TrainConfig):
    """PPO settings: :class:`TrainConfig` plus rollouts, reward, KL penalty and the PPO update.

    train_file: prompts (rows with a ``prompt`` string; preference rows give their prompt).
    reward_model: a ``preftune reward`` model directory; or reward_fn: ``sentiment`` (VADER, the
      demo's ground truth) or ``package.module:function`` taking (prompts, completions) -> rewards.
    Optimizer steps = num_rollouts (default: ``epochs`` passes over the prompts) x ppo_epochs x
    minibatches per rollout; ``max_steps`` is not used (set num_rollouts).
    """

    learning_rate: float = 1e-5
    output_dir: str = "runs/ppo"
    reward_model: str | None = None
    reward_fn: str | None = None
    rollout_batch_size: int = 64
    num_rollouts: int | None = None
    max_new_tokens: int = 48
    temperature: float = 1.0
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float | None = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_target: float | None = None  # per-sequence KL the adaptive controller steers to
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    length_penalty: float = 0.0
    reference: str = "auto"  # auto (adapter with LoRA, else a frozen copy) | model | adapter
    reference_model: str | None = None
    reference_ema: float | None = None  # after each round: ref <- (1 - a) ref + a policy

    def validate(self) -> None:
        super().validate()
        checks = {
            "rollout_batch_size": self.rollout_batch_size >= 1, "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature > 0, "ppo_epochs": self.ppo_epochs >= 1,
            "gamma": 0 <= self.gamma <= 1, "lam": 0 <= self.lam <= 1, "clip_range": self.clip_range > 0,
            "vf_coef": self.vf_coef >= 0, "kl_coef": self.kl_coef >= 0, "kl_horizon": self.kl_horizon >= 1,
            "num_rollouts": self.num_rollouts is None or self.num_rollouts >= 1,
            "kl_target": self.kl_target is None or self.kl_target > 0,
            "reference_ema": self.reference_ema is None or 0 < self.reference_ema <= 1,
        }
        check_ranges(self, checks)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"config: kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, "
                             f"got {self.kl_estimator!r}")
        if self.max_steps is not None:
            raise ValueError("config: PPO counts rounds, not steps; set num_rollouts instead of max_steps")
        if self.max_completion_length is not None:
            raise ValueError("config: PPO completions are limited by max_new_tokens; "
                             "remove max_completion_length")
        if self.layout != "prefix_shared":
            raise ValueError("config: PPO scores its rollouts in the prefix_shared layout; remove 'layout'")
        if self.reward_model and self.reward_fn:
            raise ValueError("config: set reward_model or reward_fn, not both")
        if self.reference not in ("auto", "model", "adapter"):
            raise ValueError(f"config: reference must be auto, model or adapter, got {self.reference!r}")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("config: reference 'adapter' needs lora: true")
        if self.reference_ema is not None and (self.lora or self.reference == "adapter"):
            raise ValueError("config: reference_ema needs a full-weight policy and a frozen reference "
                             "(lora: false)")
        # rollouts are scored as sampled (prompt <= max_prompt_length, completion <= max_new_tokens),
        # never evaluated
        self.no_effect(("eval_file", "eval_on_start", "eval_batch_size", "max_length", "pack_length"),
                       "in PPO")

    def minibatch_size(self, num_processes: int = 1) -> int:
        """Samples per optimizer step, over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * num_processes

    def rounds(self, num_prompts: int) -> int:
        return self.num_rollouts or max(1, math.ceil(self.epochs * num_prompts / self.rollout_batch_size))

    def round_sizes(self, num_prompts: int) -> list[int]:
        """Samples of each round: ``rollout_batch_size``, except where the prompts run out (fewer
        prompts than ``rollout_batch_size``, or the last round of a pass over them), exactly as
        :func:`~preftune.engine.loop.step_indices` slices the seeded permutations."""
        per_pass = math.ceil(num_prompts / self.rollout_batch_size)
        return [min(self.rollout_batch_size, num_prompts - (r % per_pass) * self.rollout_batch_size)
                for r in range(self.rounds(num_prompts))]
