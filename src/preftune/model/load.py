"""Load models and tokenizers (local directories; the embedded model by default)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from preftune.model.hub import explain_failure, from_hub_or_path, resolve_model_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(
    name: str | None,
    *,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A causal LM in ``dtype`` (an image-text-to-text model when its config has a vision part, see
    :mod:`preftune.model.vision`); weights are read from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from preftune.model.vision import is_vision_config, model_config
    from preftune.quiet import no_hub_bars

    no_hub_bars()
    path = resolve_model_path(name)
    try:
        vision = is_vision_config(model_config(path, trust_remote_code))
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        return from_hub_or_path("model", path, lambda: auto.from_pretrained(
            path,
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            use_safetensors=True,
        ))
    except Exception as e:  # a broken directory (truncated weights, bad config): one line on what is wrong
        explain_failure("model", path, e, trust_remote_code=trust_remote_code)
        raise


def load_tokenizer(name: str | None, *, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> Any:
    """A tokenizer; one without a pad token gets EOS as pad (padding is never scored); ``chat_template``
    (Jinja text) replaces the tokenizer's own and is saved with it."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = from_hub_or_path("tokenizer", path, lambda: AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code))
    except Exception as e:  # a broken directory (corrupt tokenizer.json): one line saying what is wrong
        explain_failure("tokenizer", path, e, tokenizer=True)
        raise
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to zero (modules and attention-dropout config fields)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "attention_dropout"):
            config.attention_dropout = 0.0
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0


def apply_lora(
    model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str] | str
) -> nn.Module:
    """Wrap ``model`` with LoRA adapters via ``peft``; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    from preftune.quiet import peft_wrapping

    with peft_wrapping():
        return get_peft_model(model, config)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: unchanged), restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
