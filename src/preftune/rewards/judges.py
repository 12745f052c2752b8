"""Judges: who says which completion is better, for PPO, iterative DPO and evaluation.

* a reward (pointwise): ``reward(prompts, completions) -> [n]`` floats, from
  - ``"sentiment"``: VADER sentiment of the completion (the lab's ground truth r*),
  - a ``preftune reward`` model directory (scored as ``preftune.score`` scores), or
  - ``"package.module:function"``: any importable Python function of that signature;
* a pairwise judge: ``judge(prompts, first, second) -> [n]`` probabilities that ``first`` is better,
  from ``"package.module:function"``, or from a reward through the Bradley-Terry link
  ``P(a > b) = sigmoid((r(a) - r(b)) / T)`` (T = 0: 1, 0 or 1/2 on a tie).

Judges are called through :func:`call_reward` and :func:`call_pairwise`, which pass, as keyword arguments
the judge takes (by name, or ``**kwargs``):

* ``images``: per item, its prompt's images (each a file path, or the encoded bytes of an image given
  inline) when any prompt has images; a judge that takes no ``images`` is then refused (it would judge
  answers to images it cannot see), except ``sentiment``, which reads the completion alone;
* every other column of the prompt rows (e.g. a ground-truth ``answer``; not a preference row's answers),
  per item (None where a row lacks it), as TRL passes a dataset's columns to its reward functions.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from preftune.data.rows import Prompt, as_prompt
from preftune.rewards.annotator import bradley_terry_probability, sentiment_reward

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]
PairwiseJudge = Callable[[list[str], list[str], list[str]], Sequence[float]]

__all__ = ["PairwiseJudge", "RewardFunction", "call_pairwise", "call_reward", "check_reward_spec",
           "check_takes_images", "import_function", "judge_columns", "load_pairwise_judge", "load_reward",
           "pairwise_from_reward", "sentiment"]


def sentiment(prompts: Sequence[str], completions: Sequence[str], images: Any = None) -> list[float]:
    """The lab's ground truth as a reward: VADER sentiment of each completion (prompts and their images
    ignored)."""
    return sentiment_reward(completions)


# -- calling a judge ------------------------------------------------------------------------------------
def judge_columns(prompts: Sequence[str | Prompt]) -> dict[str, list[Any]]:
    """Per item (one prompt each): ``images`` when any prompt has images, and each column of the rows."""
    items = [as_prompt(p) for p in prompts]
    columns: dict[str, list[Any]] = {}
    if any(p.images for p in items):
        columns["images"] = [[r.path if r.path is not None else r.encoded() for r in p.images] for p in items]
    names = dict.fromkeys(k for p in items for k in p.columns if k != "images")
    for name in names:
        columns[name] = [p.columns.get(name) for p in items]
    return columns


def _keywords(fn: Callable[..., Any], positional: int) -> tuple[set[str], bool, set[str]]:
    """(the names ``fn`` takes by keyword beyond its first ``positional`` arguments, whether it takes
    ``**kwargs``, the names of those first arguments)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no keywords
        return set(), False, set()
    kinds = inspect.Parameter
    takes_all = any(p.kind is kinds.VAR_KEYWORD for p in params.values())
    ordered = [n for n, p in params.items() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    named = {n for n, p in params.items() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    taken = set(ordered[:positional])
    return named - taken, takes_all, taken


def check_takes_images(fn: Callable[..., Any], what: str, positional: int = 2) -> None:
    """For prompts with images, before anything is sampled: a judge that takes no ``images`` is refused in
    one line (``positional``: its leading arguments, 2 for a reward, 3 for a pairwise judge)."""
    named, takes_all, _ = _keywords(fn, positional)
    if not (takes_all or "images" in named):
        raise ValueError(f"{what}: the prompts have images, but the judge takes no 'images' argument (it "
                         "would judge answers to images it cannot see); give a package.module:function "
                         "judge that takes images=[the prompt's image paths, per item]")


def call_with_columns(fn: Callable[..., Any], args: tuple, columns: dict[str, list[Any]], what: str) -> Any:
    """``fn(*args, **those columns it takes)``; refused (one line) when ``columns`` holds images it does
    not take."""
    if "images" in columns:
        check_takes_images(fn, what, len(args))
    named, takes_all, taken = _keywords(fn, len(args))
    return fn(*args, **{k: v for k, v in columns.items()
                        if k.isidentifier() and k not in taken and (takes_all or k in named)})


def _floats(values: Any, n: int, what: str) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != n:
        raise ValueError(f"{what} returned {len(out)} values for {n} items")
    return out


def call_reward(reward: Callable[..., Any], prompts: Sequence[str | Prompt], completions: Sequence[str], *,
                what: str = "judge") -> list[float]:
    """``[n]`` rewards of ``completions`` (item i answers ``prompts[i]``), the prompts' images and columns
    passed as the reward takes them (see the module docstring)."""
    texts = [as_prompt(p).text for p in prompts]
    values = call_with_columns(reward, (texts, list(completions)), judge_columns(prompts), what)
    return _floats(values, len(texts), what)


def call_pairwise(judge: Callable[..., Any], prompts: Sequence[str | Prompt], first: Sequence[str],
                  second: Sequence[str], *, what: str = "pairwise_judge") -> list[float]:
    """``[n]`` P(first[i] better than second[i]) for ``prompts[i]``, columns passed as for
    :func:`call_reward`."""
    texts = [as_prompt(p).text for p in prompts]
    values = call_with_columns(judge, (texts, list(first), list(second)), judge_columns(prompts), what)
    return _floats(values, len(texts), what)


def import_function(spec: str, what: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function; a clear error naming ``what`` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{what}: expected 'sentiment', a reward model directory or "
                         f"'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what}: {spec!r} cannot be imported ({e})") from None
    if not callable(fn):
        raise ValueError(f"{what}: {spec!r} is not callable")
    return fn


def load_reward(spec: str, *, what: str = "reward", device: Any = None, max_length: int | None = 1024,
                max_prompt_length: int | None = 512) -> RewardFunction:
    """A pointwise reward from its name (see the module docstring)."""
    if spec == "sentiment":
        return sentiment
    check_reward_spec(spec, what)
    if os.path.isdir(spec):
        from preftune.model.load import load_tokenizer
        from preftune.rewards.reward_model import load_reward_model, score

        tokenizer = load_tokenizer(spec)
        model = load_reward_model(spec, pad_token_id=tokenizer.pad_token_id).eval()
        if device is not None:
            model = model.to(device)
        return lambda prompts, completions: score(model, prompts, completions, tokenizer=tokenizer,
                                                  max_length=max_length, max_prompt_length=max_prompt_length)
    return import_function(spec, what)


def check_reward_spec(spec: str, what: str, *, trust_remote_code: bool = False) -> None:
    """Before anything loads: a reward spec naming a directory must be a usable reward model directory
    (config, safetensors weights, tokenizer: :func:`~preftune.model.load.check_model_path`), one that
    looks like a path must exist; one line naming ``what``. Functions are imported only when loaded."""
    if spec == "sentiment":
        return
    if os.path.isdir(spec):
        from preftune.model.hub import check_model_path

        check_model_path(what, spec, with_tokenizer=True, trust_remote_code=trust_remote_code, label=what)
    elif ":" not in spec and ("/" in spec or spec.startswith(".")):
        raise FileNotFoundError(f"{what}: no reward model directory at {spec!r}")


def pairwise_from_reward(reward: RewardFunction, temperature: float = 0.0) -> PairwiseJudge:
    """A pairwise judge from a reward: P(first > second) = sigmoid((r1 - r2) / T)."""

    def judge(prompts: list[str], first: list[str], second: list[str], **columns: Any) -> list[float]:
        r1 = call_with_columns(reward, (prompts, first), columns, "judge")
        r2 = call_with_columns(reward, (prompts, second), columns, "judge")
        return [bradley_terry_probability(a, b, temperature) for a, b in zip(r1, r2)]

    return judge


def load_pairwise_judge(spec: str, *, what: str = "judge") -> PairwiseJudge:
    """``"package.module:function"`` taking (prompts, first, second) -> P(first better)."""
    return import_function(spec, what)
