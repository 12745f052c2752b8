"""Bradley-Terry reward models on the same data, batching, loop and checkpoints as DPO.

A scalar head reads the hidden state of each sequence's final token (its EOS):
r(x, y) = w^T h_last(x, y). Loss per pair, with soft label p and optional margin m:

    loss = -p * log sigmoid(r(x, y_w) - r(x, y_l) - m) - (1 - p) * log sigmoid(-(r_w - r_l - m))
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from preftune.data.batching import ForwardBatch
from preftune.data.tokenize import Budgets
from preftune.engine.config import TrainConfig, build_config, load_config
from preftune.engine.loop import StepOutput, Trainer, TrainResult
from preftune.engine.model_card import MethodCard
from preftune.engine.setup import budgets, load_causal_lm_weights, prepare_run
from preftune.losses.reward import bradley_terry_loss
from preftune.methods import CITATIONS
from preftune.model.load import disable_dropout
from preftune.rewards.reward_model import SETTINGS_FILE, RewardScorer, load_reward_model

logger = logging.getLogger("preftune")


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model run settings (see :class:`TrainConfig`); LoRA is not supported here yet."""

    learning_rate: float = 1e-5
    output_dir: str = "runs/reward"
    gradient_checkpointing: bool = False  # not applied to reward models: true is refused

    def validate(self) -> None:
        super().validate()
        if self.lora:
            raise ValueError("config: lora is not supported for reward models yet; set lora: false")
        self.no_effect(("gradient_checkpointing", "logit_chunk_size"), "for reward models (no output layer "
                       "is chunked, no activations are recomputed)")


class RewardObjective:
    """The Bradley-Terry loss of a scalar reward model on preference pairs; saves a Hugging Face
    directory with the token budgets and chat template it was trained with."""

    def __init__(self, scorer: RewardScorer, tokenizer: Any, budgets: Budgets | None = None):
        self.module, self.tokenizer, self.budgets = scorer, tokenizer, budgets or Budgets()

    def loss(self, batch: ForwardBatch) -> StepOutput:
        rewards = self.module(batch)
        chosen, rejected = rewards[: batch.num_pairs], rewards[batch.num_pairs :]
        loss = bradley_terry_loss(chosen, rejected, batch.preference, batch.margin)
        margin = (chosen - rejected).detach()
        return StepOutput(loss, {"rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach(),
                                 "rewards/margins": margin, "rewards/accuracies": (margin > 0).float()})

    def derived_metrics(self, row: dict[str, float]) -> dict[str, float]:
        """None: every metric is a mean per pair."""
        return {}

    def frozen_modules(self) -> list[nn.Module]:
        """None: no separate frozen model."""
        return []

    def save(self, directory: Path) -> None:
        self.module.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        settings = {"max_length": self.budgets.max_length,
                    "max_prompt_length": self.budgets.max_prompt_length,
                    "max_completion_length": self.budgets.max_completion_length,
                    "chat_template": getattr(self.tokenizer, "chat_template", None)}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")

    def load(self, directory: Path) -> None:
        load_causal_lm_weights(self.module.model, directory)


def train_reward(config: RewardConfig | dict[str, Any], *, callbacks=(),
                 accelerator: Accelerator | None = None) -> TrainResult:
    """Train a scalar reward model with the Bradley-Terry loss; saves a Hugging Face directory."""
    if isinstance(config, dict):
        config = build_config(RewardConfig, config)
    setup = prepare_run(config, accelerator, kind="paired", images=False)  # text-only reward models
    model = load_reward_model(config.model, trust_remote_code=config.trust_remote_code,
                              pad_token_id=setup.tokenizer.pad_token_id)
    if config.disable_dropout:
        disable_dropout(model)
    objective = RewardObjective(RewardScorer(model), setup.tokenizer, budgets(config))
    steps, evaluation = setup.dataset_steps()
    card = MethodCard("a Bradley-Terry reward model", "reward", ("reward-model",), CITATIONS["reward"],
                      pipeline_tag="text-classification")
    trainer = Trainer(config, objective, steps, evaluation=evaluation, accelerator=setup.accelerator,
                      callbacks=callbacks, card=card)
    return trainer.fit()


def load_reward_config(path: str | None, overrides: list[str] | None = None) -> RewardConfig:
    return load_config(RewardConfig, path, overrides)


