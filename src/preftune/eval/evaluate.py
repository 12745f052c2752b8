"""``preftune eval``: models against a baseline on held-out prompts and preference pairs.

For each model directory (and the baseline), on the same prompts and with the same sampling seeds
(so every comparison is paired, sample by sample):

* samples: K continuations per prompt (:func:`~preftune.model.generation.sample_continuations`);
  length = generated tokens, the stop token not counted; drift = mean length - the baseline's, and
  their ratio;
* KL(pi || pi_ref) from the model's own samples (:func:`~preftune.model.generation.kl_estimate`);
* win rate against the baseline under a judge, its bootstrap interval over prompts, the
  length-controlled win rate, and for a pairwise judge position swapping with its agreement rate
  (formulas in :mod:`preftune.eval.winrate`);
* a Bradley-Terry leaderboard over all models from their pairwise judgments;
* on preference pairs (``pairs``): accuracy and mean margin of the implicit reward
  r(x, y) = beta [log pi(y|x) - log pi_ref(y|x)] for a causal LM, or of the reward itself for a
  reward-model directory (a config whose architectures end in ``ForSequenceClassification``);
  accuracy = mean_i [p_i h(m_i) + (1 - p_i) h(-m_i)], m_i = r(y_w) - r(y_l),
  h(m) = 1[m > 0] + 1/2 1[m = 0], p_i the row's ``preference`` (1 by default); margin = mean m_i.

Writes ``eval.json`` (:class:`EvalResult`), ``report.md``, ``samples.jsonl`` and PNG plots to
``output_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preftune.cli_args import OneLineParser
from preftune.data.rows import Prompt
from preftune.eval.config import EvalConfig
from preftune.eval.eval_report import EvalResult, ModelEval, PreferenceAccuracy
from preftune.eval.inputs import fit_budgets, load_prompts, model_kind, model_label, tokenize_eval_pairs
from preftune.eval.scoring import (
    PAIR_BATCH,
    Judges,
    accuracy_from_rewards,
    mean_se,
    pair_logps,
    preference_accuracy,
    reward_model_accuracy,
    same_vocab,
)
from preftune.eval.winrate import compare, fit_leaderboard, reward_preferences, win_table

__all__ = ["EvalConfig", "EvalResult", "ModelEval", "PreferenceAccuracy", "build_parser", "evaluate_models",
           "main", "model_kind", "preference_accuracy"]

logger = logging.getLogger("preftune")


def evaluate_models(config: EvalConfig | dict[str, Any]) -> EvalResult:
    """Run the evaluation of the module docstring; write its files under ``config.output_dir``."""
    if isinstance(config, dict):
        config = config_from_mapping(config)
    from preftune.model.load import torch_threads

    with torch_threads(config.threads):
        return _evaluate(config)


@dataclasses.dataclass
class _Run:
    """What every model of one evaluation is measured against: pi_ref, the pairs, the prompts, the judges."""

    config: EvalConfig
    device: Any
    kinds: dict[str, str]  # "policy" or "reward_model" of each of ``config.models``
    judges: Judges
    reference_path: str
    reference: Any  # pi_ref, on ``device``, in eval mode
    ref_tokenizer: Any
    max_prompt_length: int
    tokenized: Any = None  # the pairs as token ids (``.pairs``, ``.dropped_identical``); None without pairs
    ref_chosen: np.ndarray | None = None  # [n] log pi_ref(y_w|x) of the pairs
    ref_rejected: np.ndarray | None = None  # [n] log pi_ref(y_l|x)
    pair_preferences: np.ndarray | None = None  # [n] p_i of the pairs
    images: Any = None  # pi_ref's ImageInputs (an image-text reference), else None
    prompts: list[Prompt] = dataclasses.field(default_factory=list)
    prompt_source: str = ""
    flat_prompts: list[Prompt] = dataclasses.field(default_factory=list)  # [P K]: each prompt K times
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Samples:
    """The policies' samples by name, flattened like ``_Run.flat_prompts``: ``[P K]`` texts, lengths in
    tokens and rewards under the reward judge."""

    texts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    lengths: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    rewards: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _evaluate(config: EvalConfig) -> EvalResult:
    import torch

    from preftune.eval.eval_report import summarize, write_outputs
    from preftune.eval.inputs import check_eval_paths

    check_eval_paths(config)  # every model directory, before anything loads (one line each)
    start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    run = _prepare(config, device)
    samples = _Samples()
    results = [_measure(run, samples, name, path, is_base) for name, path, is_base in _players(config)]
    policies = [m for m in results if m.kind == "policy"]
    available = [(j, label) for j, label in (("reward", run.judges.reward_label),
                                             ("pairwise", run.judges.pairwise_label)) if label is not None]
    computed = _win_rates(run, samples, policies, available)
    primary = available[-1] if available else None
    leaderboard = (_leaderboard(run, samples, policies, primary, computed)
                   if primary is not None and len(policies) >= 2 else None)
    result = EvalResult(results, leaderboard, primary[1] if primary else None, [], len(run.prompts),
                        config.num_samples, run.prompt_source, config.settings(), run.notes)
    result.summary = summarize(result)
    write_outputs(result, Path(config.output_dir), run.flat_prompts, samples.texts, samples.lengths,
                  samples.rewards)
    result.wall_time_s = time.perf_counter() - start
    Path(result.files["eval"]).write_text(result.to_json() + "\n", encoding="utf-8")
    return result


def _load(path: str, device: Any) -> Any:
    from preftune.model.load import load_model

    return load_model(path).to(device).eval()


def _prepare(config: EvalConfig, device: Any) -> _Run:
    """Check that the baseline and the reference are causal LMs; load the reference, the pairs (with
    their log pi_ref), the judges and the prompts."""
    from transformers import AutoConfig

    from preftune.data.tokenize import Budgets
    from preftune.model.hub import resolve_model_path
    from preftune.model.load import load_tokenizer
    from preftune.model.vision import load_image_inputs

    reference_path = config.reference or config.baseline
    for path, what in ((config.baseline, "baseline"), (reference_path, "reference")):
        if model_kind(path) != "policy":
            raise ValueError(f"eval: the {what} {path!r} is a reward model; it must be a causal LM")
    kinds = {path: model_kind(path) for path in config.models}
    ref_tokenizer = load_tokenizer(reference_path)
    max_length, max_prompt_length = fit_budgets(config,
                                                AutoConfig.from_pretrained(resolve_model_path(reference_path)))
    images = load_image_inputs(reference_path, ref_tokenizer)
    # the pairs as token ids in a memory-mapped store (no text kept); a file with no usable pair stops here
    budgets = Budgets(max_length, max_prompt_length)
    tokenized = tokenize_eval_pairs(config, ref_tokenizer, budgets, images).data if config.pairs else None
    judges = Judges(config, device)
    run = _Run(config, device, kinds, judges, reference_path, _load(reference_path, device), ref_tokenizer,
               max_prompt_length, tokenized, images=images)
    if tokenized is not None:
        run.ref_chosen, run.ref_rejected = pair_logps(run.reference, tokenized.pairs, PAIR_BATCH, images)
        run.pair_preferences = np.fromiter((p.preference for p in tokenized.pairs), float,
                                           len(tokenized.pairs))
    if config.temperature != 1.0:
        run.notes.append(f"samples drawn at temperature {config.temperature}: the KL column is the mean "
                         "log-ratio of those samples, a KL only at temperature 1")
    run.prompts, run.prompt_source = load_prompts(config, load_tokenizer(config.baseline))
    run.flat_prompts = [p for p in run.prompts for _ in range(config.num_samples)]
    if any(p.images for p in run.prompts):  # before anything is sampled
        judges.check_takes_images()
    return run


def _players(config: EvalConfig) -> list[tuple[str, str, bool]]:
    """(name, path, is the baseline) of the baseline and each model; a repeated name gets ``#2``, ``#3``..."""
    players = [(model_label(config.baseline), config.baseline, True)]
    players += [(model_label(p), p, False) for p in config.models]
    seen: dict[str, int] = {}
    for i, (name, path, is_base) in enumerate(players):  # unique names
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            players[i] = (f"{name}#{seen[name]}", path, is_base)
    return players


def _measure(run: _Run, samples: _Samples, name: str, path: str, is_base: bool) -> ModelEval:
    """One model's row: a reward model's accuracy on the pairs, or a policy's samples (kept in
    ``samples``), length, KL, implicit-reward accuracy and mean reward."""
    from preftune.model.hub import resolve_model_path
    from preftune.model.load import load_tokenizer
    from preftune.model.vision import load_image_inputs, same_image_tokens

    kind = "policy" if is_base else run.kinds[path]
    evaluation = ModelEval(name, path, kind, is_base)
    if kind == "reward_model":
        if run.tokenized is not None:
            logger.info("eval: %s: reward model, scoring the pairs of %s", name, run.config.pairs)
            evaluation.accuracy = reward_model_accuracy(path, run.config, run.device)
        else:
            run.notes.append(f"{name} is a reward model and no pairs were given: nothing to measure")
        return evaluation
    same = resolve_model_path(path) == resolve_model_path(run.reference_path)
    model = run.reference if same else _load(path, run.device)
    tokenizer = load_tokenizer(path)
    images = run.images if same else load_image_inputs(path, tokenizer)
    drawn = _sample(run, samples, evaluation, model, tokenizer, images)
    if not same_vocab(tokenizer, run.ref_tokenizer):
        run.notes.append(f"{name}: its tokenizer differs from the reference's: no KL, no implicit reward")
    elif not same_image_tokens(images, run.images):
        run.notes.append(f"{name}: its images become other tokens than the reference's: no KL, no implicit "
                         "reward")
    else:
        _against_reference(run, evaluation, model, drawn)
    if run.judges.reward is not None:
        samples.rewards[name] = run.judges.rewards(run.flat_prompts, samples.texts[name])
        evaluation.reward, evaluation.reward_stderr = mean_se(samples.rewards[name])
    return evaluation


def _sample(run: _Run, samples: _Samples, evaluation: ModelEval, model: Any, tokenizer: Any,
            images: Any) -> list[Any]:
    """K samples per prompt of ``model`` (``images``: its ImageInputs, None for a text model), flattened
    ``[P K]``; their texts and lengths go to ``samples``, the mean length and stop rate to ``evaluation``."""
    from preftune.model.generation import sample_continuations

    config, name = run.config, evaluation.name
    logger.info("eval: %s: sampling %d prompts x %d", name, len(run.prompts), config.num_samples)
    groups = sample_continuations(model, tokenizer, run.prompts, num_samples=config.num_samples,
                                  temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                                  batch_size=config.batch_size, seed=config.seed,
                                  max_prompt_tokens=run.max_prompt_length, images=images)
    drawn = [s for g in groups for s in g]
    samples.texts[name] = [s.text for s in drawn]
    samples.lengths[name] = np.array([len(s.completion_ids) - int(s.stopped) for s in drawn], dtype=float)
    evaluation.length, evaluation.length_stderr = mean_se(samples.lengths[name])
    evaluation.stop_rate = float(np.mean([s.stopped for s in drawn]))
    return drawn


def _against_reference(run: _Run, evaluation: ModelEval, model: Any, drawn: list[Any]) -> None:
    """KL(pi || pi_ref) from the samples ``drawn``, and the accuracy of the implicit reward
    beta [log pi(y|x) - log pi_ref(y|x)] on the pairs (if any)."""
    from preftune.model.generation import kl_estimate

    kl = kl_estimate(model, run.reference, drawn, images=run.images)
    evaluation.kl, evaluation.kl_stderr, evaluation.kl_per_token = kl.mean, kl.stderr, kl.per_token
    if run.tokenized is not None:
        beta = run.config.beta
        chosen, rejected = pair_logps(model, run.tokenized.pairs, PAIR_BATCH, run.images)
        evaluation.accuracy = accuracy_from_rewards("implicit reward", beta * (chosen - run.ref_chosen),
                                                    beta * (rejected - run.ref_rejected),
                                                    run.pair_preferences, run.tokenized.dropped_identical)


def _preference(run: _Run, samples: _Samples, a: str, b: str, judge: str):
    """s [n] that a beats b under a judge (and the swap statistics of a pairwise judge)."""
    if judge == "pairwise":
        swapped = run.judges.pairwise_preferences(run.flat_prompts, samples.texts[a], samples.texts[b])
        return swapped.preference, swapped
    return reward_preferences(samples.rewards[a], samples.rewards[b]), None


def _win_rates(run: _Run, samples: _Samples, policies: list[ModelEval],
               available: list[tuple[str, str]]) -> dict[tuple[str, str, str], np.ndarray]:
    """Length drift and win rates of each policy against the baseline ``policies[0]`` under each
    ``available`` (judge, label); returns the preferences s, keyed (judge, model, baseline)."""
    config, base = run.config, policies[0]
    computed: dict[tuple[str, str, str], np.ndarray] = {}
    for m in policies[1:]:
        m.length_drift = m.length - base.length
        m.length_ratio = m.length / base.length if base.length else None
        for judge, label in available:
            s, swapped = _preference(run, samples, m.name, base.name, judge)
            computed[(judge, m.name, base.name)] = s
            m.win_rates[label] = compare(s, samples.lengths[m.name] - samples.lengths[base.name],
                                         len(run.prompts), level=config.level, num_boot=config.bootstrap,
                                         seed=config.seed, swapped=swapped)
    return computed


def _leaderboard(run: _Run, samples: _Samples, policies: list[ModelEval], primary: tuple[str, str],
                 computed: dict[tuple[str, str, str], np.ndarray]):
    """Bradley-Terry fit over every pair of policies under the ``primary`` (judge, label), reusing the
    ``computed`` preferences against the baseline."""
    judge, label = primary
    index = {m.name: i for i, m in enumerate(policies)}
    table: dict[tuple[int, int], np.ndarray] = {}
    for i, a in enumerate(policies):
        for b in policies[:i]:
            s = computed.get((judge, a.name, b.name))
            table[(index[a.name], index[b.name])] = (s if s is not None
                                                     else _preference(run, samples, a.name, b.name, judge)[0])
    wins = win_table(len(policies), table)
    return fit_leaderboard([m.name for m in policies], wins, baseline=0, judge=label, level=run.config.level,
                           prior=run.config.bt_prior)


# ---- configuration and command line ------------------------------------------------------------


def config_from_mapping(values: dict[str, Any], source: str = "eval") -> EvalConfig:
    """An :class:`EvalConfig` from a dict; an unknown key is an error with a suggestion."""
    names = [f.name for f in dataclasses.fields(EvalConfig)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ValueError(f"{source}: unknown key {key!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
    return EvalConfig(**values)


def true_or_false(value: str) -> bool:
    """A boolean flag's value (argparse reports anything else as an invalid true_or_false value)."""
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
    return value.lower() in ("true", "1", "yes")


_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("models", {"nargs": "+", "metavar": "DIR"},
     "model directories to evaluate (causal LMs or reward models)"),
    ("baseline", {}, "causal LM every model is compared with (default: embedded)"),
    ("reference", {}, "pi_ref of the KL and the implicit reward (default: the baseline)"),
    ("beta", {"type": float}, "beta of the implicit reward beta log(pi/pi_ref) (default 0.1)"),
    ("prompts", {}, "file of rows with 'prompt' (default: the prompts of --pairs, else held-out openings)"),
    ("pairs", {}, "preference pairs {prompt, chosen, rejected} for accuracy and margin"),
    ("num_prompts", {"type": int}, "use at most this many prompts (openings: default 64)"),
    ("judge", {}, "reward judge: sentiment | reward-model dir | module:function | none (default sentiment)"),
    ("pairwise_judge", {}, "pairwise judge module:function (prompts, first, second) -> P(first better)"),
    ("num_samples", {"type": int}, "samples per prompt and model (default 4)"),
    ("temperature", {"type": float}, "sampling temperature (default 1; the KL estimate needs 1)"),
    ("max_new_tokens", {"type": int}, "length limit of each sample in tokens (default 48)"),
    ("level", {"type": float}, "confidence level of the intervals (default 0.95)"),
    ("bootstrap", {"type": int}, "bootstrap resamples of the prompts (default 2000)"),
    ("bt_prior", {"type": float}, "Bradley-Terry pseudo-wins per ordered pair (default 0: plain MLE)"),
    ("max_length", {"type": int}, "token budget of a pair's sequences (default 1024)"),
    ("max_prompt_length", {"type": int}, "token budget of a pair's prompt (default 512)"),
    ("batch_size", {"type": int}, "sequences per forward / generate batch (default 64)"),
    ("output_dir", {}, "where eval.json, report.md, samples.jsonl and the plots go (default runs/eval)"),
    ("seed", {"type": int}, "seeds sampling, the openings and the bootstrap (default 0)"),
    ("device", {}, "auto | cpu | cuda | cuda:N (default auto)"),
    ("threads", {"type": int}, "torch CPU threads (default: torch's; 1 is fastest for the embedded model)"),
    ("skip_bad_rows", {"type": true_or_false, "metavar": "true|false"},
     "skip malformed rows of --prompts and --pairs instead of stopping at the first (default false)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="preftune eval", argument_default=argparse.SUPPRESS,
        description="Evaluate models against a baseline on held-out prompts and preference pairs: "
        "preference accuracy, win rate (bootstrap interval over prompts, length-controlled, position-swapped "
        "for a pairwise judge), KL to the reference, length drift, a Bradley-Terry leaderboard; writes "
        "report.md, eval.json, samples.jsonl and plots.",
        epilog="Flags override the keys of --config. Example: preftune eval --models runs/demo/final "
        "--baseline embedded --pairs runs/demo/heldout_pairs.jsonl --judge sentiment")
    parser.add_argument("--config", help="YAML file of the same keys (read with yaml.safe_load)")
    for name, kwargs, help_text in _FLAGS:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*flags, dest=name, help=help_text, **kwargs)
    return parser


def load_eval_config(argv: Sequence[str]) -> EvalConfig:
    """Parse flags (and ``--config``) into an :class:`EvalConfig`."""
    args = vars(build_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    source = "eval"
    path = args.pop("config", None)
    if path is not None:
        import yaml

        if not os.path.exists(path):
            raise FileNotFoundError(f"eval: no config file {path!r}")
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of key: value")
        values, source = loaded, path
    values.update(args)
    return config_from_mapping(values, source)


def main(argv: list[str] | None = None) -> int:
    """``preftune eval [flags]``: evaluate, print the summary and where the report is."""
    import sys

    config = load_eval_config(sys.argv[1:] if argv is None else argv)
    result = evaluate_models(config)
    from preftune.eval.eval_report import format_console

    print(format_console(result))
    return 0
