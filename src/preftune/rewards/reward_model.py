"""Reward models: a causal LM with a scalar head on the hidden state of each sequence's final token,
r(x, y) = w^T h_last(x, y), loaded, and scoring (prompt, completion) texts as training reads them.
``preftune reward`` (:mod:`preftune.methods.reward`) trains them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from preftune.data.batching import ForwardBatch, collate
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.model.hub import resolve_model_path
from preftune.model.load import load_tokenizer

logger = logging.getLogger("preftune")


SETTINGS_FILE = "preftune.json"  # beside the weights: how the model was trained to read its inputs


def load_reward_model(name: str | None, *, trust_remote_code: bool = False,
                      pad_token_id: int | None = None) -> nn.Module:
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
            raise ValueError(f"{type(model).__name__} has no 'score' head; "
                             "use a *ForSequenceClassification model")

    def forward(self, batch: ForwardBatch) -> Tensor:
        decoder = getattr(self.model, self.model.base_model_prefix)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False).last_hidden_state
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.last_index)
        return self.model.score(last).squeeze(-1).float()


def _causal_lm_only(keys: Sequence[str]) -> bool:
    """A causal LM checkpoint read as a classifier leaves only its output layer unused."""
    return all(k.startswith("lm_head.") for k in keys)


def saved_settings(directory: str | Path) -> dict[str, Any]:
    """The budgets and chat template a ``preftune reward`` model was trained with ({} if not saved)."""
    path = Path(directory) / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


Text = str | list[dict[str, str]]


UNSET: Any = object()


def _render(tokenizer: Any, prompts: Sequence[Text],
            completions: Sequence[Text]) -> tuple[list[str], list[str]]:
    """Texts as training reads them: message lists rendered with the chat template (see data.formats)."""
    from preftune.data.formats import RowParser
    from preftune.data.io import RawRow

    out_p, out_c = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if isinstance(p, str) and isinstance(c, str):
            out_p.append(p)
            out_c.append(c)
            continue
        p = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        c = [{"role": "assistant", "content": c}] if isinstance(c, str) else list(c)
        text_p, text_c = RowParser(RawRow("score", i + 1, {}), tokenizer).render("completion", p, c)
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
