"""Load models and tokenizers (local directories; the embedded model by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "stories260k"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_path(name: str | None) -> str:
    """``None`` or ``"embedded"`` -> the bundled stories260K model; otherwise the path (or hub id,
    for users whose machines reach a hub)."""
    if name in (None, "", "embedded"):
        return str(EMBEDDED_MODEL)
    return str(name)


def load_model(
    name: str | None,
    *,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A causal LM in ``dtype``; weights are read from safetensors only."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        use_safetensors=True,
    )


def load_tokenizer(name: str | None, *, trust_remote_code: bool = False) -> Any:
    """A tokenizer; one without a pad token gets EOS as pad (padding is never scored)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
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
    return get_peft_model(model, config)
