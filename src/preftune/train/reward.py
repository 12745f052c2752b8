"""Bradley-Terry reward models on the same data, batching, loop and checkpoints as DPO.

A scalar head reads the hidden state of each sequence's final token (its EOS):
r(x, y) = w^T h_last(x, y). Loss per pair, with soft label p and optional margin m:

    loss = -p * log sigmoid(r(x, y_w) - r(x, y_l) - m) - (1 - p) * log sigmoid(-(r_w - r_l - m))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from preftune.data.batching import ForwardBatch, collate
from preftune.data.tokenize import PairTokenizer
from preftune.model.load import disable_dropout, load_tokenizer, resolve_model_path
from preftune.train.config import TrainConfig, build_config, load_config
from preftune.train.loop import DatasetSteps, StepOutput, Trainer, TrainResult
from preftune.train.setup import budgets, load_causal_lm_weights, load_data, load_run_tokenizer, make_collate


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model run settings (see :class:`TrainConfig`); LoRA is not supported here yet."""

    learning_rate: float = 1e-5
    output_dir: str = "runs/reward"

    def validate(self) -> None:
        super().validate()
        if self.lora:
            raise ValueError("config: lora is not supported for reward models yet; set lora: false")


def load_reward_model(name: str | None, *, trust_remote_code: bool = False, pad_token_id: int | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification`` with one label (a fresh head on a causal LM checkpoint)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(name), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


class RewardScorer(nn.Module):
    """``forward(batch) -> [2B]`` rewards (chosen first, then rejected) from one forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if not hasattr(model, "score"):
            raise ValueError(f"{type(model).__name__} has no 'score' head; use a *ForSequenceClassification model")

    def forward(self, batch: ForwardBatch) -> Tensor:
        decoder = getattr(self.model, self.model.base_model_prefix)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False).last_hidden_state
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.last_index)
        return self.model.score(last).squeeze(-1).float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, preference: Tensor, margin: Tensor) -> Tensor:
    """Per-pair Bradley-Terry negative log-likelihood, ``[B]`` (formula in the module docstring)."""
    d = chosen - rejected - margin
    return -preference * F.logsigmoid(d) - (1 - preference) * F.logsigmoid(-d)


class RewardObjective:
    def __init__(self, scorer: RewardScorer, tokenizer: Any):
        self.module, self.tokenizer = scorer, tokenizer

    def loss(self, batch: ForwardBatch) -> StepOutput:
        rewards = self.module(batch)
        chosen, rejected = rewards[: batch.num_pairs], rewards[batch.num_pairs :]
        loss = bradley_terry_loss(chosen, rejected, batch.preference, batch.margin)
        margin = (chosen - rejected).detach()
        return StepOutput(loss, {"rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach(),
                                 "rewards/margins": margin, "rewards/accuracies": (margin > 0).float()})

    def save(self, directory: Path) -> None:
        self.module.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    def load(self, directory: Path) -> None:
        load_causal_lm_weights(self.module.model, directory)


def train_reward(config: RewardConfig | dict[str, Any], *, callbacks=(), accelerator: Accelerator | None = None
                 ) -> TrainResult:
    """Train a scalar reward model with the Bradley-Terry loss; saves a Hugging Face directory."""
    if isinstance(config, dict):
        config = build_config(RewardConfig, config)
    torch.manual_seed(config.seed)
    tokenizer = load_run_tokenizer(config)
    data = load_data(config, tokenizer)
    model = load_reward_model(config.model, trust_remote_code=config.trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id)
    if config.disable_dropout:
        disable_dropout(model)
    objective = RewardObjective(RewardScorer(model), tokenizer)
    collate = make_collate(config, tokenizer.pad_token_id)
    evaluation = DatasetSteps(config, data.eval.pairs, collate) if data.eval else None
    trainer = Trainer(config, objective, DatasetSteps(config, data.train.pairs, collate), evaluation=evaluation,
                      accelerator=accelerator, callbacks=callbacks)
    return trainer.fit()


def load_reward_config(path: str | None, overrides: list[str] | None = None) -> RewardConfig:
    return load_config(RewardConfig, path, overrides)


@torch.no_grad()
def score(
    model: nn.Module | str,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    tokenizer: Any | None = None,
    batch_size: int = 16,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
) -> list[float]:
    """Rewards r(prompt_i, completion_i), tokenized exactly as in training."""
    if len(prompts) != len(completions):
        raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_reward_model(model)
    if tokenizer is None:
        raise ValueError("score: pass tokenizer= when model is a loaded module")
    scorer = RewardScorer(model).eval()
    config = RewardConfig(train_file="-", max_length=max_length, max_prompt_length=max_prompt_length,
                          max_completion_length=None)
    pairs = PairTokenizer(tokenizer, budgets(config)).tokenize_sequences(prompts, completions)
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate(chunk, layout="padded", pad_id=tokenizer.pad_token_id).to(device)
        out += scorer(batch)[: len(chunk)].tolist()  # the chosen side; the rest are EOS stubs
    return out
