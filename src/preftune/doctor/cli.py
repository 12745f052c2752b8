"""``preftune inspect``, ``preftune aggregate`` and ``preftune select``.

Each ``*_main(argv) -> exit code``; user errors are raised as ValueError / FileNotFoundError and
printed by :func:`preftune.cli.main` as one ``preftune <command>: error: ...`` line (exit 2).
Only argparse is imported up front; numpy, torch and transformers load when a check needs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from preftune.cli_args import OneLineParser

BUDGET_KEYS = ("max_length", "max_prompt_length", "max_completion_length")


def _budget(value: str) -> int | None:
    if value.lower() in ("none", "null"):
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value}")
    return n


def _budget_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training budgets (default: a DPO run's: 1024, 512, none; or --config's)")
    g.add_argument(
        "--config", help="a DPO/reward YAML config: its budgets, batch_size, layout, tokenizer are used"
    )
    for key in BUDGET_KEYS:
        g.add_argument(f"--{key.replace('_', '-')}", type=_budget, default=argparse.SUPPRESS, metavar="N")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < ``--config`` YAML < command-line flags, for the budget-like settings."""
    out: dict[str, Any] = {
        "max_length": 1024,
        "max_prompt_length": 512,
        "max_completion_length": None,
        "batch_size": 8,
        "layout": None,
        "pack_length": None,
        "tokenizer": None,
        "seed": 0,
    }
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings")
        out.update({k: config[k] for k in out if k in config})
        if config.get("tokenizer") is None and config.get("model") is not None:
            out["tokenizer"] = config["model"]
    out.update({k: v for k, v in vars(args).items() if k in out and v is not None})
    return out


def _budgets(settings: dict[str, Any]):
    """The budgets training will use: with a model as tokenizer, defaults are capped to its
    positions exactly as ``preftune dpo`` caps them (``preftune.engine.setup.fit_max_length``)."""
    from preftune.data.tokenize import Budgets

    model = settings.get("tokenizer")
    if model is not None:
        from preftune.engine.config import TrainConfig
        from preftune.engine.setup import fit_max_length

        try:
            config = TrainConfig(train_file="-", model=model, **{k: settings[k] for k in BUDGET_KEYS})
            fit_max_length(config)
            settings.update({k: getattr(config, k) for k in BUDGET_KEYS})
        except (OSError, ValueError):  # a tokenizer without a model config, or budgets set above it: as given
            pass
    return Budgets(*(settings[k] for k in BUDGET_KEYS))


def _inspect_parser() -> argparse.ArgumentParser:
    from preftune.doctor.checkup import DEFAULT_DROP, REASONS

    parser = OneLineParser(
        prog="preftune inspect",
        description="Report what a preference file will teach: bad rows, duplicates, conflicts, length "
        "bias; with a tokenizer, truncation and padding; with an eval file, contamination; with a model, "
        "likely label flips. Writes report.md, inspect.json and plots; never modifies the data.",
    )
    parser.add_argument(
        "data", help="a preference file (.jsonl .json .csv .parquet, optionally .gz) or dataset dir"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer for the token checks ('embedded' or a directory)"
    )
    parser.add_argument(
        "--eval", dest="eval_file", help="an eval file: train/eval prompt n-gram contamination"
    )
    parser.add_argument(
        "--model",
        help="a DPO policy (implicit reward, with --reference) or a reward model "
        "directory: likely label flips and the flip rate",
    )
    parser.add_argument("--reference", help="reference model of a DPO policy (default: embedded)")
    parser.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (default 0.1)")
    parser.add_argument("--out", default="runs/inspect", help="output directory (default runs/inspect)")
    parser.add_argument(
        "--write-clean",
        metavar="OUT",
        help="write a filtered copy (.jsonl[.gz]) and OUT's .removed.jsonl log of every removed row",
    )
    parser.add_argument(
        "--drop",
        default=",".join(DEFAULT_DROP),
        help=f"removal reasons for --write-clean, comma-separated, of {', '.join(REASONS)} "
        f"(default {','.join(DEFAULT_DROP)}; bad rows always go)",
    )
    _budget_args(parser)
    _inspect_check_args(parser)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def _inspect_check_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the padding, near-duplicate, contamination and flip checks."""
    parser.add_argument(
        "--batch-size", dest="batch_size", type=int, default=None, help="for padding (default 8)"
    )
    parser.add_argument(
        "--layout",
        action="append",
        choices=("padded", "packed", "prefix_shared"),
        help="layouts to measure padding of (repeatable; default all three)",
    )
    parser.add_argument("--pack-length", dest="pack_length", type=int, default=None)
    parser.add_argument(
        "--padding-batches", type=int, default=16, help="training batches measured (default 16)"
    )
    parser.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard for near duplicates (0.8)")
    parser.add_argument("--ngram", type=int, default=8, help="words per n-gram for contamination (8)")
    parser.add_argument(
        "--contamination-threshold", type=float, default=0.5, help="n-gram overlap share (0.5)"
    )
    parser.add_argument(
        "--flip-threshold",
        type=float,
        default=None,
        help="|margin| above which a pair counts as confident (default: the median |margin|)",
    )


def _inspect_options(args: argparse.Namespace):
    """The checked :class:`~preftune.doctor.checkup.InspectOptions` of the flags, and the removal
    reasons of ``--drop``."""
    from preftune.doctor.checkup import InspectOptions

    if not 0 < args.near_threshold <= 1 or not 0 < args.contamination_threshold <= 1:
        raise ValueError("--near-threshold and --contamination-threshold must be in (0, 1]")
    if args.ngram < 1 or args.padding_batches < 1:
        raise ValueError("--ngram and --padding-batches must be >= 1")
    drop = tuple(x.strip() for x in args.drop.split(",") if x.strip())
    s = _settings(args)
    if s["batch_size"] < 1:
        raise ValueError(f"--batch-size must be >= 1, got {s['batch_size']}")
    layouts = (
        tuple(args.layout)
        if args.layout
        else ((s["layout"],) if isinstance(s["layout"], str) else ("padded", "packed", "prefix_shared"))
    )
    options = InspectOptions(
        tokenizer=s["tokenizer"],
        budgets=_budgets(s),
        batch_size=s["batch_size"],
        layouts=layouts,
        pack_length=s["pack_length"],
        seed=s["seed"],
        max_padding_batches=args.padding_batches,
        near_threshold=args.near_threshold,
        eval_file=args.eval_file,
        ngram=args.ngram,
        contamination_threshold=args.contamination_threshold,
        model=args.model,
        reference=args.reference,
        beta=args.beta,
        flip_threshold=args.flip_threshold,
    )
    return options, drop


def inspect_main(argv: list[str]) -> int:
    args = _inspect_parser().parse_args(argv)

    from preftune.doctor.checkup import inspect_data, write_clean
    from preftune.doctor.report import write_report

    options, drop = _inspect_options(args)
    inspection = inspect_data(args.data, options)
    inspection.removals(drop)  # unknown or unavailable reasons fail before anything is written
    report = write_report(inspection, args.out, drop, plots=not args.no_plots)
    summary = inspection.summary
    t = summary["text"]
    print(
        f"{t['rows']} rows, {t['pairs']} pairs, {t['bad_rows']['count']} bad; "
        f"{t['exact_duplicates']['pairs']['excess']} duplicate pairs, {t['conflicts']['groups']} conflicts; "
        f"chosen longer in {100 * t['length_bias']['chars'].get('share_chosen_longer', 0):.1f}% "
        f"({summary['seconds']:.1f} s)"
    )
    for line in summary["suggestions"]:
        print(f"- {line}")
    if args.write_clean:
        done = write_clean(args.data, args.write_clean, inspection, drop)
        print(
            f"clean copy: {done['kept']} rows in {done['out']}; {done['removed']} removed, "
            f"logged in {done['log']}"
        )
    print(f"report: {report}")
    return 0


def aggregate_main(argv: list[str]) -> int:
    parser = OneLineParser(
        prog="preftune aggregate",
        description="Aggregate several annotators' judgments of the same pairs (rows with 'annotator' and "
        "optional 'pair_id') into one row per pair with a soft 'preference' (Dawid-Skene reliabilities), in "
        "the format `preftune dpo` reads; prints per-annotator agreement and reliability.",
    )
    parser.add_argument(
        "data", help="judgment rows: prompt/chosen/rejected (any training format) + annotator"
    )
    parser.add_argument("--out", required=True, help="aggregated pairs (.jsonl or .jsonl.gz)")
    parser.add_argument("--report", help="also write the per-annotator table as JSON here")
    parser.add_argument("--max-iter", type=int, default=200, help="EM iterations at most (200)")
    args = parser.parse_args(argv)

    from preftune.doctor.annotators import aggregate_file, format_annotators

    result = aggregate_file(args.data, args.out, max_iter=args.max_iter, report=args.report)
    print(format_annotators(result))
    print(f"{result['pairs']} pairs from {result['judgments']} judgments written to {args.out}")
    return 0


def select_main(argv: list[str]) -> int:
    parser = OneLineParser(
        prog="preftune select",
        description="From unlabelled candidate pairs (prompt + two replies, in any training format), pick "
        "the --budget pairs whose labels would inform the model most: the most uncertain under the "
        "model's margin, skipping prompts too close to ones already picked.",
    )
    parser.add_argument(
        "pool", help="candidate pairs; chosen/rejected are read as the two candidates, unordered"
    )
    parser.add_argument("--budget", type=int, required=True, help="how many pairs to pick")
    parser.add_argument(
        "--model", required=True, help="a DPO policy (implicit reward) or a reward model directory"
    )
    parser.add_argument("--reference", help="reference model of a DPO policy (default: embedded)")
    parser.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (default 0.1)")
    parser.add_argument(
        "--max-similarity",
        type=float,
        default=0.5,
        help="skip a candidate whose prompt's estimated Jaccard with a picked one is >= this (0.5)",
    )
    parser.add_argument("--out", default="runs/select/to_label.jsonl", help="picked pairs (.jsonl[.gz])")
    _budget_args(parser)
    args = parser.parse_args(argv)
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    if not 0 < args.max_similarity <= 1:
        raise ValueError(f"--max-similarity must be in (0, 1], got {args.max_similarity}")

    from preftune.doctor.selection import select_file

    done = select_file(
        args.pool,
        args.out,
        budget=args.budget,
        model=args.model,
        reference=args.reference,
        beta=args.beta,
        budgets=_budgets(_settings(args)),
        max_similarity=args.max_similarity,
    )
    print(
        f"picked {done['picked']} of {done['candidates']} candidates (mean uncertainty "
        f"{done['mean_uncertainty']:.3f} vs {done['pool_mean_uncertainty']:.3f} in the pool); "
        f"written to {done['out']}"
    )
    if done["bad_rows"]:
        print(f"{done['bad_rows_skipped']} bad candidate rows skipped; first: {done['bad_rows'][0]}")
    return 0
