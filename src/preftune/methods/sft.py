"""Supervised fine-tuning (SFT): the first stage of the pipeline DPO and PPO start from.

    L = - (1 / |T|) sum_{t in T} log pi_theta(y_t | x, y_<t)

over the trained tokens T of the step: completion tokens of ``{prompt, completion}`` rows, the
assistant turns of ``{messages}`` conversations, or the chosen side of preference rows
(:mod:`preftune.data.formats`). Each example weighs its number of trained tokens, so the step's
loss is the mean NLL per token over the whole step (gradient accumulation included) and
``perplexity = exp(loss)``. Same layouts (packing with per-sequence positions), loop,
checkpoints, resume and LoRA as DPO; the output is a model directory ``preftune dpo`` and
``preftune ppo`` take as ``model``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator

from preftune.data.batching import ForwardBatch
from preftune.data.tokenize import TokenizedPair
from preftune.engine.config import TrainConfig, build_config, load_config
from preftune.engine.loop import StepOutput, Trainer, TrainResult
from preftune.engine.model_card import MethodCard
from preftune.engine.setup import CausalLMCheckpoints, DataBundle, load_policy_scorer, prepare_run
from preftune.model.logps import SequenceScorer


@dataclass
class SFTConfig(TrainConfig):
    """SFT run settings: :class:`TrainConfig` (data, model, LoRA, layout, optimisation, output)."""

    learning_rate: float = 2e-5
    output_dir: str = "runs/sft"


def trained_tokens(example: TokenizedPair) -> float:
    """The example's weight in a step: its number of trained (scored) completion tokens."""
    mask = example.chosen_mask
    return float(len(example.chosen_ids) if mask is None else sum(mask))


class SFTObjective(CausalLMCheckpoints):
    """Per-example summed NLL of the trained tokens; the loop divides by the step's token count."""

    def __init__(self, policy: SequenceScorer, tokenizer: Any):
        self.module, self.tokenizer = policy, tokenizer

    def loss(self, batch: ForwardBatch) -> StepOutput:
        logps = self.module(batch)  # chosen = the example; rejected = nothing (0 tokens)
        return StepOutput(-logps.chosen, {"tokens": logps.chosen_tokens})

    @staticmethod
    def derived_metrics(row: dict[str, float]) -> dict[str, float]:
        """Per-token perplexity exp(mean NLL), for training and evaluation rows."""
        return {key.replace("loss", "perplexity"): math.exp(min(v, 700.0)) for key, v in row.items()
                if key in ("loss", "eval/loss")}


@dataclass
class SFTRun:
    train: TrainResult
    data: DataBundle


def train_sft(config: SFTConfig | dict[str, Any], *, callbacks=(),
              accelerator: Accelerator | None = None) -> SFTRun:
    """Fine-tune a causal LM on demonstrations (see the module docstring); saves ``output_dir/final``."""
    if isinstance(config, dict):
        config = build_config(SFTConfig, config)
    setup = prepare_run(config, accelerator, kind="sft")
    objective = SFTObjective(load_policy_scorer(config), setup.saved_with)
    steps, evaluation = setup.dataset_steps(units=trained_tokens)
    card = MethodCard("supervised fine-tuning on demonstrations", "sft", ("sft",))
    trainer = Trainer(config, objective, steps, evaluation=evaluation, accelerator=setup.accelerator,
                      callbacks=callbacks, card=card)
    return SFTRun(trainer.fit(), setup.data)


def load_sft_config(path: str | None, overrides: list[str] | None = None) -> SFTConfig:
    return load_config(SFTConfig, path, overrides)
