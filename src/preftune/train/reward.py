"""Bradley-Terry reward models on the same data, batching, loop and checkpoints as DPO.

A scalar head reads the hidden state of each sequence's final token (its EOS):
r(x, y) = w^T h_last(x, y). Loss per pair, with soft label p and optional margin m:

    loss = -p * log sigmoid(r(x, y_w) - r(x, y_l) - m) - (1 - p) * log sigmoid(-(r_w - r_l - m))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from preftune.data.batching import ForwardBatch, collate
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.model.load import disable_dropout, load_tokenizer, resolve_model_path
from preftune.train.config import TrainConfig, build_config, load_config
from preftune.train.faults import check_output_dir
from preftune.train.loop import DatasetSteps, StepOutput, Trainer, TrainResult
from preftune.train.setup import budgets, load_causal_lm_weights, load_data, load_run_tokenizer, make_collate

logger = logging.getLogger("preftune")
SETTINGS_FILE = "preftune.json"  # beside the weights: how the model was trained to read its inputs


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
        self.no_effect(("gradient_checkpointing", "logit_chunk_size"), "for reward models (no output layer is "
                       "chunked, no activations are recomputed)")


def load_reward_model(name: str | None, *, trust_remote_code: bool = False, pad_token_id: int | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification`` with one label (a fresh head on a causal LM checkpoint)."""
    from transformers import AutoModelForSequenceClassification

    from preftune.quiet import expected_load_report, no_hub_bars

    no_hub_bars()
    with expected_load_report():  # the fresh head is expected; any other missing weight is reported below
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True,
            output_loading_info=True,
        )
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("score.")]
    if missing or info.get("unexpected_keys") and not _causal_lm_only(info["unexpected_keys"]):
        logger.warning("reward model %s: missing weights %s, unused weights %s", name, missing,
                       sorted(info.get("unexpected_keys", ())))
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


def _causal_lm_only(keys: Sequence[str]) -> bool:
    """A causal LM checkpoint read as a classifier leaves only its output layer unused."""
    return all(k.startswith("lm_head.") for k in keys)


class RewardObjective:
    def __init__(self, scorer: RewardScorer, tokenizer: Any, budgets: Budgets | None = None):
        self.module, self.tokenizer, self.budgets = scorer, tokenizer, budgets or Budgets()

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
        settings = {"max_length": self.budgets.max_length, "max_prompt_length": self.budgets.max_prompt_length,
                    "max_completion_length": self.budgets.max_completion_length,
                    "chat_template": getattr(self.tokenizer, "chat_template", None)}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")

    def load(self, directory: Path) -> None:
        load_causal_lm_weights(self.module.model, directory)


def train_reward(config: RewardConfig | dict[str, Any], *, callbacks=(), accelerator: Accelerator | None = None
                 ) -> TrainResult:
    """Train a scalar reward model with the Bradley-Terry loss; saves a Hugging Face directory."""
    if isinstance(config, dict):
        config = build_config(RewardConfig, config)
    check_output_dir(config)  # refuse a used output_dir before loading anything
    torch.manual_seed(config.seed)
    tokenizer = load_run_tokenizer(config)
    data = load_data(config, tokenizer)
    model = load_reward_model(config.model, trust_remote_code=config.trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id)
    if config.disable_dropout:
        disable_dropout(model)
    objective = RewardObjective(RewardScorer(model), tokenizer, budgets(config))
    collate = make_collate(config, tokenizer.pad_token_id)
    evaluation = DatasetSteps(config, data.eval.pairs, collate) if data.eval else None
    trainer = Trainer(config, objective, DatasetSteps(config, data.train.pairs, collate), evaluation=evaluation,
                      accelerator=accelerator, callbacks=callbacks)
    return trainer.fit()


def load_reward_config(path: str | None, overrides: list[str] | None = None) -> RewardConfig:
    return load_config(RewardConfig, path, overrides)


def saved_settings(directory: str | Path) -> dict[str, Any]:
    """The budgets and chat template a ``preftune reward`` model was trained with ({} if not saved)."""
    path = Path(directory) / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


Text = str | list[dict[str, str]]
UNSET: Any = object()


def _render(tokenizer: Any, prompts: Sequence[Text], completions: Sequence[Text]) -> tuple[list[str], list[str]]:
    """Texts as training reads them: message lists rendered with the chat template (see data.formats)."""
    from preftune.data.formats import _RowParser
    from preftune.data.io import RawRow

    out_p, out_c = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if isinstance(p, str) and isinstance(c, str):
            out_p.append(p)
            out_c.append(c)
            continue
        p = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        c = [{"role": "assistant", "content": c}] if isinstance(c, str) else list(c)
        text_p, text_c = _RowParser(RawRow("score", i + 1, {}), tokenizer).render("completion", p, c)
        out_p.append(text_p)
        out_c.append(text_c)
    return out_p, out_c


@torch.no_grad()
def score(
    model: nn.Module | str,
    prompts: Sequence[Text],
    completions: Sequence[Text],
    *,
    tokenizer: Any | None = None,
    batch_size: int = 16,
    max_length: int | None = UNSET,
    max_prompt_length: int | None = UNSET,
    max_completion_length: int | None = UNSET,
) -> list[float]:
    """Rewards r(prompt_i, completion_i), tokenized exactly as in training: a model directory's
    saved budgets and chat template (``preftune.json``) are used unless given here (else 1024 / 512
    / none). Prompts and completions are strings or lists of ``{role, content}`` messages."""
    if len(prompts) != len(completions):
        raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    saved: dict[str, Any] = {}
    if isinstance(model, str):
        saved = saved_settings(model)
        tokenizer = tokenizer or load_tokenizer(model, chat_template=saved.get("chat_template"))
        model = load_reward_model(model)
    if tokenizer is None:
        raise ValueError("score: pass tokenizer= when model is a loaded module")
    given = {"max_length": max_length, "max_prompt_length": max_prompt_length,
             "max_completion_length": max_completion_length}
    fallback = {"max_length": 1024, "max_prompt_length": 512, "max_completion_length": None}
    limits = {k: v if v is not UNSET else saved.get(k, fallback[k]) for k, v in given.items()}
    scorer = RewardScorer(model).eval()
    texts = _render(tokenizer, prompts, completions)
    pairs = PairTokenizer(tokenizer, Budgets(**limits)).tokenize_sequences(*texts)
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate(chunk, layout="padded", pad_id=tokenizer.pad_token_id).to(device)
        out += scorer(batch)[: len(chunk)].tolist()  # the chosen side; the rest are EOS stubs
    return out
