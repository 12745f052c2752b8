"""Setup shared by every objective: model + tokenizer, data, collate function, weight I/O."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from preftune.data.batching import ForwardBatch, collate
from preftune.data.formats import load_preference_data
from preftune.data.tokenize import Budgets, PairTokenizer, TokenizedData, TokenizedPair
from preftune.model.load import apply_lora, disable_dropout, load_model, load_tokenizer
from preftune.train.config import TrainConfig

logger = logging.getLogger("preftune")


@dataclass
class DataBundle:
    """Tokenized train/eval data and what was dropped on the way."""

    train: TokenizedData
    eval: TokenizedData | None
    skipped_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.train.pairs)} training pairs"]
        if self.eval is not None:
            parts.append(f"{len(self.eval.pairs)} eval pairs")
        if self.skipped_rows:
            parts.append(f"{len(self.skipped_rows)} bad rows skipped")
        dropped = self.train.dropped_identical + (self.eval.dropped_identical if self.eval else 0)
        if dropped:
            parts.append(f"{dropped} pairs dropped (chosen == rejected after truncation)")
        truncated = self.train.truncated
        if truncated:
            parts.append(f"{truncated} training pairs truncated")
        return ", ".join(parts)


def autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast when ``precision: bf16`` (weights and optimizer state stay fp32), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def make_accelerator(config: TrainConfig):
    """The ``Accelerator``; precision comes from the preftune config (autocast), not from accelerate."""
    from accelerate import Accelerator

    # cpu=True on machines without an accelerator lets `torchrun`/`accelerate launch` run gloo processes
    accelerator = Accelerator(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    if accelerator.mixed_precision not in ("no", config.precision.replace("fp32", "no")):
        raise ValueError(
            f"accelerate is configured for mixed precision {accelerator.mixed_precision!r} but the config says "
            f"precision: {config.precision}; set precision in the preftune config only"
        )
    return accelerator


def load_policy(config: TrainConfig) -> nn.Module:
    """The trainable causal LM: dropout off (by default), checkpointing and LoRA as configured."""
    model = load_model(config.model, trust_remote_code=config.trust_remote_code)
    if config.disable_dropout:
        disable_dropout(model)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora:
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules)
    return model


def load_run_tokenizer(config: TrainConfig) -> Any:
    return load_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)


def budgets(config: TrainConfig) -> Budgets:
    return Budgets(config.max_length, config.max_prompt_length, config.max_completion_length)


def load_data(config: TrainConfig, tokenizer: Any, kind: str = "paired") -> DataBundle:
    """Read, validate and tokenize train (and eval) files. Errors name file, row and field."""
    pair_tokenizer = PairTokenizer(tokenizer, budgets(config))

    def load(files: list[str]) -> tuple[TokenizedData, list[str]]:
        loaded = load_preference_data(files, kind=kind, tokenizer=tokenizer, skip_bad_rows=config.skip_bad_rows)
        if kind == "unpaired":
            return pair_tokenizer.tokenize_unpaired(loaded.unpaired), loaded.skipped
        if kind == "sft":
            return pair_tokenizer.tokenize_sft(loaded.sft), loaded.skipped
        return pair_tokenizer.tokenize(loaded.pairs), loaded.skipped

    train, skipped = load(config.train_files)
    evaluation = None
    if config.eval_files:
        evaluation, eval_skipped = load(config.eval_files)
        skipped += eval_skipped
    if not train.pairs:
        what = "examples" if kind == "sft" else "pairs"
        raise ValueError(f"{', '.join(config.train_files)}: no training {what} left after tokenization")
    bundle = DataBundle(train, evaluation, skipped)
    for message in skipped:
        logger.warning("skipped: %s", message)
    logger.info("data: %s", bundle.summary())
    return bundle


def make_collate(config: TrainConfig, pad_id: int):
    """``collate(pairs, indices) -> ForwardBatch`` in the configured layout."""

    def fn(pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> ForwardBatch:
        return collate(pairs, indices, layout=config.layout, pack_length=config.pack_length, pad_id=pad_id)

    return fn


def save_causal_lm(model: nn.Module, tokenizer: Any, directory: Path, *, merged: bool = True) -> None:
    """``save_pretrained`` (safetensors) + tokenizer; a PEFT model saves its adapter under
    ``adapter/`` and, with ``merged``, the merged weights at the top so plain transformers loads them."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory / "adapter", safe_serialization=True)
        if merged:
            import copy

            copy.deepcopy(model).merge_and_unload().save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


class CausalLMCheckpoints:
    """``save``/``load`` for objectives whose ``module`` wraps a causal LM as ``module.model``."""

    module: nn.Module
    tokenizer: Any

    def save(self, directory: Path) -> None:
        save_causal_lm(self.module.model, self.tokenizer, directory)

    def load(self, directory: Path) -> None:
        load_causal_lm_weights(self.module.model, directory)


def load_causal_lm_weights(model: nn.Module, directory: Path) -> None:
    """Load weights written by :func:`save_causal_lm` into ``model`` (in place, for resume)."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter" / "adapter_model.safetensors")))
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")

