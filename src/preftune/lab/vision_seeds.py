"""``preftune lab vision`` over several seeds: each arm's figures as mean ± sd, and each arm's difference
from SFT judged against the seeds' spread.

Seed s runs the whole lab (model, data, SFT, pairs, DPO arms, evaluation) into ``output_dir/seed_s``. For
arm a and a figure f (greedy accuracy, ...), d_s = f(a, s) - f(SFT, s) is its paired difference on seed s;
the report calls the difference a gain or a loss only when |mean(d)| > sd(d) and every d_s has the mean's
sign, and otherwise says it is within the seeds' spread."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from preftune.lab.options import build_options_parser, command_line
from preftune.lab.vision import PolicyScore, VisionLabOptions, VisionLabResult, format_report, run_vision_lab

# figure -> how a PolicyScore gives it (the report's rows)
FIGURES = {
    "greedy accuracy": lambda p: p.accuracy,
    "greedy accuracy, colour": lambda p: p.by_kind["colour"],
    "greedy accuracy, count": lambda p: p.by_kind["count"],
    "greedy accuracy, shape": lambda p: p.by_kind["shape"],
    "sampled accuracy": lambda p: p.sampled_accuracy,
    "win rate vs SFT": lambda p: p.win_rate,
    "KL(pi || pi_SFT), nats per answer": lambda p: p.kl,
}


def run_seeds(options: VisionLabOptions, log=print) -> list[VisionLabResult]:
    """The lab with seeds ``seed .. seed + seeds - 1``, each into ``output_dir/seed_s``; writes
    ``results.json`` (every seed's figures) and ``report.md`` into ``output_dir``."""
    out = Path(options.output_dir)
    results = []
    for s in range(options.seed, options.seed + options.seeds):
        log(f"== seed {s} ({s - options.seed + 1} of {options.seeds})")
        results.append(run_vision_lab(replace(options, seed=s, seeds=1, output_dir=str(out / f"seed_{s}")),
                                      log=log))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"options": asdict(options),
                                                  "seeds": [asdict(r) for r in results]}, indent=2) + "\n")
    (out / "report.md").write_text(format_seeds_report(results, options))
    return results


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def verdict(differences: list[float]) -> str:
    """'gain' / 'loss' when |mean| > sd and every seed agrees in sign, else 'within the spread'."""
    mean = statistics.fmean(differences)
    sd = statistics.stdev(differences) if len(differences) > 1 else float("inf")
    agree = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    if agree and abs(mean) > sd:
        return "gain" if mean > 0 else "loss"
    return "within the spread"


def format_seeds_report(results: list[VisionLabResult], options: VisionLabOptions) -> str:
    arms = list(results[0].policies)
    scores: dict[str, list[PolicyScore]] = {a: [r.policies[a] for r in results] for a in arms}
    lines = ["# preftune lab vision: DPO on a tiny image-text model, over seeds", "",
             f"{len(results)} seeds ({options.seed}..{options.seed + len(results) - 1}): mean ± sd over "
             f"seeds of each figure on {options.test_prompts} unseen images per seed.", "",
             "| | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    lines += [f"| {name} | " + " | ".join(_mean_sd([get(p) for p in scores[a]]) for a in arms) + " |"
              for name, get in FIGURES.items()]
    lines += ["", "Each arm against SFT, seed by seed (paired differences d; a gain or a loss only when "
              "|mean d| > sd d and every seed agrees in sign):", ""]
    for arm in arms[1:]:
        for name in ("greedy accuracy", "sampled accuracy"):
            d = [FIGURES[name](a) - FIGURES[name](s) for a, s in zip(scores[arm], scores["sft"], strict=True)]
            lines.append(f"- {arm}, {name}: d = {', '.join(f'{x:+.3f}' for x in d)} "
                         f"(mean {statistics.fmean(d):+.3f}): {verdict(d)}")
    pairs = [r.pairs for r in results]
    lines += ["", f"Labelled pairs per seed: {', '.join(map(str, pairs))}. Time: "
              f"{sum(r.seconds for r in results):.0f} s. Command: "
              f"`{command_line('preftune lab vision', options)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``preftune lab vision``: one seed (``--seeds 1``: the single run's report) or several."""
    parser = build_options_parser(VisionLabOptions, "preftune lab vision",
                                  "SFT then DPO of a tiny image-text model on synthetic images, offline.")
    options = VisionLabOptions(**vars(parser.parse_args(argv)))
    if options.seeds > 1:
        print(format_seeds_report(run_seeds(options), options))
    else:
        print(format_report(run_vision_lab(options), options))
    print(f"report: {Path(options.output_dir) / 'report.md'}")
    return 0
