"""PPO with a KL penalty (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022): the RLHF
stage DPO replaces, on the same loop, batching, checkpoints and metrics.

Each round r:

1. rollout: ``rollout_batch_size`` prompts (epoch-wise seeded order, like every dataset here; fewer
   where the prompts run out, :meth:`PPOConfig.round_sizes`), one completion each, sampled from the
   current policy (``generate``; prompts with images: :mod:`preftune.model.image_sampling`, each image
   encoded once), seed ``seed + 7919 r``;
2. score s(x, y) from a reward model, ``preftune.score`` or a Python function, minus
   ``missing_eos_penalty`` (no stop token) and ``length_penalty * |y|``;
3. one no-grad pass (prefix-shared layout, output layer only at completion tokens): old log-probs,
   values V_t (a linear value head on the policy's hidden state), entropy, reference log-probs;
4. per-token reward r_t = -kl_coef * KL_t (estimator k1 or k3), plus s at the last token; GAE
   advantages (gamma, lam), whitened over the rollout; returns R_t = A_t + V_t;
5. ``ppo_epochs`` passes over the rollout in seeded minibatches of ``batch_size`` (x gradient
   accumulation x processes), one optimizer step each, minimising per token
       max(-A ratio, -A clip(ratio, 1 +- clip_range)) + vf_coef * 0.5 max((V - R)^2, (V_clip - R)^2);
6. the KL coefficient adapts to ``kl_target`` (Ziegler's proportional controller) when one is set,
   and the reference can follow the policy as an EMA (``reference_ema``).

A loop step is one optimizer step on one minibatch, so schedules, clipping and logging are the
loop's own; the rollout being trained on travels in every checkpoint, so a resume mid-round
continues with the same samples and reaches the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from preftune.data.images import ImageInputs
from preftune.data.rows import Prompt, as_prompt
from preftune.engine.config import build_config, load_config
from preftune.engine.loop import StepOutput, Trainer, TrainResult
from preftune.engine.model_card import MethodCard
from preftune.engine.setup import (
    load_causal_lm_weights,
    load_frozen,
    load_policy_scorer,
    load_run_images,
    prepare_run,
    save_causal_lm,
)
from preftune.engine.sharding import make_sharding
from preftune.losses.ppo import (
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
)
from preftune.methods import CITATIONS
from preftune.methods.ppo_config import PPOConfig
from preftune.methods.ppo_rollout import PolicyValue, RolloutBatch, RolloutSteps, TokenReference, per_sequence
from preftune.model.logps import SequenceScorer
from preftune.rewards.judges import RewardFunction, check_takes_images

logger = logging.getLogger("preftune")
VALUE_HEAD_FILE = "value_head.safetensors"
REFERENCE_FILE = "reference_ema.safetensors"


# -- the objective ------------------------------------------------------------------------
class PPOObjective:
    """Clipped policy and value losses per sequence (summed over its tokens; the loop divides by
    the step's token count, so the step minimises the per-token mean)."""

    def __init__(self, module: PolicyValue, config: PPOConfig, tokenizer: Any,
                 reference: TokenReference, saved_with: Any = None):
        self.module, self.config, self.tokenizer, self.reference = module, config, tokenizer, reference
        self.saved_with = saved_with or tokenizer  # beside the weights: an image processor or the tokenizer

    def loss(self, batch: RolloutBatch) -> StepOutput:
        cfg, fwd = self.config, batch.forward
        logps, values = self.module(fwd)
        pg, clipped = clipped_policy_loss(logps, batch.old_logps, batch.advantages, cfg.clip_range)
        vf, vf_clipped = clipped_value_loss(values, batch.old_values, batch.returns, cfg.clip_range_value)
        loss = per_sequence(pg + cfg.vf_coef * vf, fwd)
        d = lambda t: per_sequence(t.detach().float(), fwd)  # noqa: E731
        return StepOutput(loss, {"loss/policy": d(pg), "loss/value": d(vf), "ppo/clipfrac": d(clipped),
                                 "ppo/value_clipfrac": d(vf_clipped),
                                 "ppo/approx_kl": d(approx_kl(logps, batch.old_logps)),
                                 "ppo/ratio": d(torch.exp(logps - batch.old_logps))})

    def derived_metrics(self, row: dict[str, float]) -> dict[str, float]:
        """None: the rollout statistics come with each step (:class:`RolloutSteps`)."""
        return {}

    def frozen_modules(self) -> list[nn.Module]:
        """None: no separate frozen model."""
        return []

    def _unwrapped(self) -> PolicyValue:
        module = self.module
        return getattr(module, "module", module)  # DDP wraps the module

    def save(self, directory: Path) -> None:
        policy = self._unwrapped()
        save_causal_lm(policy.model, self.saved_with, directory)
        save_file({k: v.contiguous() for k, v in policy.value_head.state_dict().items()},
                  str(directory / VALUE_HEAD_FILE))
        if self.config.reference_ema is not None:
            save_file({k: v.contiguous() for k, v in self.reference.scorer.model.state_dict().items()},
                      str(directory / REFERENCE_FILE))

    def load(self, directory: Path) -> None:
        policy = self._unwrapped()
        load_causal_lm_weights(policy.model, directory)
        policy.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD_FILE)))
        if self.config.reference_ema is not None:
            weights = load_file(str(directory / REFERENCE_FILE))
            self.reference.scorer.model.load_state_dict(weights, strict=False)


# -- rewards and prompts --------------------------------------------------------------------
def resolve_reward(config: PPOConfig, device: torch.device) -> RewardFunction:
    """The reward of ``reward_model`` (scored as ``preftune.score`` does) or of ``reward_fn``."""
    from preftune.rewards.judges import load_reward

    if not (config.reward_model or config.reward_fn):
        raise ValueError("config: PPO needs a reward: set reward_model (a preftune reward model) "
                         "or reward_fn")
    if config.reward_model and not Path(config.reward_model).is_dir():
        raise FileNotFoundError(f"config: reward_model: no reward model directory at "
                                f"{config.reward_model!r}")
    return load_reward(config.reward_model or config.reward_fn, what="config: reward_fn", device=device)


def load_prompts(config: PPOConfig, tokenizer: Any) -> list[Prompt]:
    """Prompts of the train files: rows with a ``prompt`` string, or preference rows' prompts, with their
    images. Prompts longer than ``max_prompt_length`` tokens are counted; rollouts keep their last tokens
    (and every image token)."""
    from preftune.data.formats import read_prompts

    prompts = read_prompts(config.train_sources, tokenizer, skip_bad_rows=config.skip_bad_rows)
    limit = config.max_prompt_length
    longer = sum(limit is not None
                 and len(tokenizer(p.text, truncation=True, max_length=limit + 1)["input_ids"]) > limit
                 for p in prompts)
    if longer:
        logger.info("prompts: %d of %d longer than max_prompt_length (%s) keep their last %s tokens",
                    longer, len(prompts), limit, limit)
    return prompts


@dataclass
class PPORun:
    train: TrainResult
    num_prompts: int
    reference_mode: str


def build_reference(config: PPOConfig, policy: PolicyValue, device: torch.device) -> TokenReference:
    """The LoRA policy with its adapters off (``reference``: ``adapter``, or ``auto`` with LoRA), else
    a frozen copy of ``reference_model`` (default: ``model``) on ``device``."""
    if config.lora and config.reference in ("auto", "adapter"):
        return TokenReference(policy.scorer, adapter=True)
    frozen = load_frozen(config.reference_model or config.model, config)
    scorer = SequenceScorer(frozen.eval().requires_grad_(False), config.logit_chunk_size)
    return TokenReference(scorer.to(device), adapter=False)


def _prompt_images(config: PPOConfig, prompts: Sequence[Prompt], tokenizer: Any) -> ImageInputs | None:
    """The model's image inputs when a prompt has images (None otherwise); a text-only model with such
    prompts is one line."""
    with_images = next((p for p in prompts if p.images), None)
    if with_images is None:
        return None
    images = load_run_images(config, tokenizer)
    if images is None:
        raise ValueError(f"{with_images.origin or 'prompt'}: field 'images': model {config.model} is "
                         "text-only; prompts with images need an image-text model")
    return images


def train_ppo(config: PPOConfig | dict[str, Any], *, prompts: Sequence[str | Prompt] | None = None,
              reward_fn: RewardFunction | None = None, callbacks=(),
              accelerator: Accelerator | None = None) -> PPORun:
    """Train a policy with PPO against a reward (see the module docstring). ``prompts`` and
    ``reward_fn`` (a callable (prompts, completions) -> rewards) override the config's."""
    if isinstance(config, dict):
        values = dict(config)
        values.setdefault("train_file", "-" if prompts is not None else None)
        config = build_config(PPOConfig, {k: v for k, v in values.items() if v is not None})
    setup = prepare_run(config, accelerator, kind=None)  # the data: prompts, read here
    accelerator, tokenizer = setup.accelerator, setup.tokenizer
    if make_sharding(accelerator).name == "fsdp":  # generate runs the model outside its sharded forward
        raise ValueError("ppo: sharded training (FSDP) is not built for PPO yet (its rollouts sample "
                         "with the model's generate); launch with configs/accelerate/ddp.yaml")
    prompts = [as_prompt(p) for p in prompts] if prompts is not None else load_prompts(config, tokenizer)
    images = _prompt_images(config, prompts, tokenizer)
    reward = reward_fn or resolve_reward(config, accelerator.device)
    if images is not None:  # before anything loads or is sampled
        check_takes_images(reward, "reward_fn")
    policy = PolicyValue(load_policy_scorer(config)).to(accelerator.device)
    reference = build_reference(config, policy, accelerator.device)
    if len(prompts) < config.rollout_batch_size:
        logger.info("rollouts: %d prompts, fewer than rollout_batch_size %d: each round samples all %d",
                    len(prompts), config.rollout_batch_size, len(prompts))
    steps = RolloutSteps(config, prompts, policy, reference, reward, tokenizer, images)
    objective = PPOObjective(policy, config, tokenizer, reference, images.processor if images else None)
    card = MethodCard(f"PPO with a KL penalty (kl_coef {config.kl_coef})", "ppo", ("ppo", "rlhf"),
                      CITATIONS["ppo"])
    trainer = Trainer(config, objective, steps, accelerator=accelerator, callbacks=callbacks, card=card)
    return PPORun(trainer.fit(), len(prompts), "adapter" if reference.adapter else "model")


def load_ppo_config(path: str | None, overrides: list[str] | None = None) -> PPOConfig:
    return load_config(PPOConfig, path, overrides)
