"""Load models and tokenizers (local directories; the embedded model by default)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "stories260k"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as on the Hugging Face hub
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
T = TypeVar("T")


def resolve_model_path(name: str | None) -> str:
    """``None`` or ``"embedded"`` -> the bundled stories260K model; otherwise the path (or hub id,
    for users whose machines reach a hub)."""
    if name in (None, "", "embedded"):
        return str(EMBEDDED_MODEL)
    return str(name)


def check_model_path(key: str, name: str | None, *, tokenizer: bool = False) -> None:
    """One line (FileNotFoundError) naming ``key`` when ``name`` is neither "embedded", a model
    directory (with config.json; for a tokenizer, with tokenizer files) nor a hub id ``org/name``."""
    if name in (None, "", "embedded"):
        return
    path = Path(name)
    if path.is_dir():
        wanted = TOKENIZER_FILES if tokenizer else ("config.json",)
        if not any((path / f).is_file() for f in wanted):
            what = f"tokenizer files ({', '.join(wanted)})" if tokenizer else "config.json"
            raise FileNotFoundError(f"config: {key}: {name} is a directory without {what}; "
                                    "point it at a Hugging Face model directory")
        return
    if path.exists():
        raise FileNotFoundError(f"config: {key}: {name} is a file, not a model directory")
    if not HUB_ID.match(str(name)) or str(name).startswith((".", "~")):
        raise FileNotFoundError(f"config: {key}: no such model directory: {name}")


def from_hub_or_path(key: str, name: str, load: Callable[[], T]) -> T:
    """``load()``; a hub id that cannot be fetched (offline, unknown, gated) becomes one line naming ``key``."""
    try:
        return load()
    except OSError as e:
        if Path(name).exists():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"config: {key}: {name} is not a local directory and could not be loaded from "
                                f"the Hugging Face hub ({first})") from e


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
    vision = is_vision_config(model_config(path, trust_remote_code))
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    return from_hub_or_path("model", path, lambda: auto.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        use_safetensors=True,
    ))


def load_tokenizer(name: str | None, *, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    """A tokenizer; one without a pad token gets EOS as pad (padding is never scored); ``chat_template``
    (Jinja text) replaces the tokenizer's own and is saved with it."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    tok = from_hub_or_path("tokenizer", path,
                           lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
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
