"""What a ``preftune eval`` run (:mod:`preftune.eval.evaluate`) is given: the kind and display name
of a model directory, the prompts, and the pair budgets fitted to the reference model."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.data.rows import Prompt

if TYPE_CHECKING:
    from preftune.eval.config import EvalConfig

logger = logging.getLogger("preftune")
DEFAULT_OPENINGS = 64


def model_kind(path: str) -> str:
    """"reward_model" when the directory's config.json names a ``*ForSequenceClassification``
    architecture, else "policy"."""
    from preftune.model.hub import resolve_model_path

    config = Path(resolve_model_path(path)) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"eval: {path}: no config.json (not a Hugging Face model directory)")
    try:
        values = json.loads(config.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        from preftune.model.hub import first_line

        raise ValueError(f"eval: {path}: config.json is not valid JSON ({first_line(e)})") from None
    architectures = (values.get("architectures") if isinstance(values, dict) else None) or []
    return "reward_model" if any(a.endswith("ForSequenceClassification") for a in architectures) else "policy"


def check_eval_paths(config: EvalConfig) -> None:
    """Before anything loads: each model directory of an evaluation (baseline, reference, models) and a
    reward-model judge is usable (config, safetensors weights, tokenizer: the checks of
    :func:`~preftune.model.load.check_model_path`), one line naming the flag and the path otherwise."""
    from preftune.model.hub import check_model_path
    from preftune.rewards.judges import check_reward_spec

    named = [("baseline", config.baseline), ("reference", config.reference)]
    named += [("models", m) for m in config.models]
    for key, path in named:
        if isinstance(path, str):  # every one is loaded with its own tokenizer
            check_model_path(key, path, with_tokenizer=True, label=f"eval: {key}")
    if isinstance(config.judge, str):
        check_reward_spec(config.judge, "eval: judge")


def model_label(path: str) -> str:
    """A short display name: the directory's name, with its parent's for ``final``/``checkpoint-*``."""
    p = Path(path.rstrip("/"))
    generic = p.name in ("final", "model", "best") or p.name.startswith("checkpoint")
    return f"{p.parent.name}/{p.name}" if generic and p.parent.name else (p.name or path)


def load_prompts(config: EvalConfig, tokenizer: Any) -> tuple[list[Prompt], str]:
    """The prompts (see :class:`EvalConfig`) and a phrase saying where they came from. The prompts of
    ``pairs`` are read as a stream, each once, up to ``num_prompts``."""
    from preftune.data.formats import iter_prompts, read_prompts

    if config.prompts:
        prompts = read_prompts(config.prompts, tokenizer, skip_bad_rows=config.skip_bad_rows)
        source = config.prompts
    elif config.pairs:
        unique: dict[Prompt, None] = {}  # equal prompts: the same text and images
        for prompt in iter_prompts(config.pairs, tokenizer, skip_bad_rows=config.skip_bad_rows):
            unique[prompt] = None
            if len(unique) == config.num_prompts:
                break
        prompts, source = list(unique), f"the prompts of {config.pairs}"
    else:
        from preftune.data.openings import load_openings, split_prompts

        n = config.num_prompts or DEFAULT_OPENINGS
        prompts = [Prompt(p) for p in split_prompts(load_openings(), 1, n, config.seed)[1]]
        return prompts, f"{n} held-out TinyStories openings (seed {config.seed})"
    if config.num_prompts:
        prompts = prompts[: config.num_prompts]
    return prompts, f"{len(prompts)} prompts from {source}"


def fit_budgets(config: EvalConfig, reference_config: Any) -> tuple[int | None, int | None]:
    """The pair budgets, capped (with one log line) to the reference model's positions (its
    ``config.max_position_embeddings``) when left at their defaults; the sampled prompts keep their
    last ``max_prompt_length`` tokens."""
    from preftune.eval.config import EvalConfig  # at run time: evaluate imports this module

    positions = getattr(reference_config, "max_position_embeddings", None)
    max_length, max_prompt = config.max_length, config.max_prompt_length
    if not isinstance(positions, int) or max_length is None or max_length <= positions:
        return max_length, max_prompt
    defaults = EvalConfig.__dataclass_fields__
    if max_length != defaults["max_length"].default:
        raise ValueError(f"eval: max_length {max_length} exceeds the reference model's {positions} positions")
    max_length = positions
    if max_prompt is not None and max_prompt >= positions - config.max_new_tokens:
        max_prompt = max(1, min(positions // 2, positions - config.max_new_tokens))
    logger.info("eval: max_length %d, max_prompt_length %s: the reference model has %d positions", max_length,
                max_prompt, positions)
    return max_length, max_prompt


def tokenize_eval_pairs(config: EvalConfig, tokenizer: Any, budgets: Any, images: Any = None) -> Any:
    """``config.pairs`` tokenized with the reference's tokenizer into a memory-mapped store, streamed
    and cached as for training (:func:`~preftune.data.pipeline.tokenize_files`): a
    :class:`~preftune.data.pipeline.TokenizedFiles`. Skipped rows are logged, one line each."""
    from preftune.data.pipeline import tokenize_files

    tokenized = tokenize_files([config.pairs], tokenizer, budgets, kind="paired",
                               skip_bad_rows=config.skip_bad_rows, purpose="eval --pairs", images=images)
    for message in tokenized.skipped:
        logger.warning("skipped: %s", message)
    return tokenized


def iter_pair_chunks(config: EvalConfig, tokenizer: Any, size: int) -> Iterator[list[Any]]:
    """The preference pairs of ``config.pairs`` (texts, for scoring by a reward model with its own
    tokenizer), ``size`` at a time, read as a stream."""
    from preftune.data.formats import LoadedData, iter_examples
    from preftune.data.io import read_rows
    from preftune.data.pipeline import chunks_of

    examples = iter_examples(read_rows(config.pairs), kind="paired", tokenizer=tokenizer,
                             skip_bad_rows=config.skip_bad_rows, purpose="eval --pairs", skips=LoadedData())
    return chunks_of(examples, size)
