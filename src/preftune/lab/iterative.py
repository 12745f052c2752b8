"""``preftune lab iterate``: iterative (online) DPO against offline DPO on the same number of judged
pairs, on the embedded model.

* pi_0 = the embedded TinyStories model; ground truth r* = VADER sentiment (never seen in training);
* the judge r_phi = a Bradley-Terry reward model trained on the demo's offline pairs (two samples of
  pi_0 per prompt, labelled from r* with annotator noise);
* iterative: ``rounds`` rounds; round r samples k completions of pi_{r-1} for its own
  ``prompts_per_round`` prompts, r_phi judges them, best-vs-worst pairs train pi_r with DPO from
  pi_{r-1} (reference: pi_0);
* offline: the same prompts (all rounds' together), k samples of pi_0 each, the same judge and pair
  rule, one DPO run from pi_0: the same number of judged pairs and of optimizer steps.

Both are placed on held-out prompts by r* and KL(pi || pi_0) from samples; the report gives the
reward of the iterative curve at the offline run's KL (linear interpolation between rounds).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.openings import load_openings, split_prompts
from preftune.lab.demo import HELDOUT_STREAM, TRAIN_STREAM, DemoOptions, labelled_pairs
from preftune.lab.options import build_options_parser, command_line, opt
from preftune.lab.pareto import FrontierPoint, write_points_jsonl
from preftune.lab.plots import plot_frontier
from preftune.lab.report import format_frontier_table, write_frontier_report
from preftune.model.load import torch_threads
from preftune.rewards.annotator import write_pairs_jsonl


@dataclass
class IterativeLabOptions:
    """Every knob of ``preftune lab iterate``."""

    output_dir: str = opt("runs/iterate-lab",
                          "where the judge, both runs, frontier.jsonl and report.md go")
    rounds: int = opt(3, "rounds of iterative DPO")
    prompts_per_round: int = opt(160, "prompts per round (offline DPO gets all rounds' prompts at once)")
    samples_per_prompt: int = opt(4, "k samples per prompt, best vs worst under the judge")
    judge_prompts: int = opt(640,
                             "prompts of the demo's offline pairs the judge (reward model) learns from")
    eval_prompts: int = opt(64, "held-out prompts")
    eval_samples: int = opt(4, "samples per held-out prompt and policy")
    max_new_tokens: int = opt(48, "length limit of every sample")
    beta: float = opt(0.1, "DPO beta")
    learning_rate: float = opt(1e-4, "DPO learning rate")
    epochs: float = opt(2.0, "DPO epochs over each round's pairs (offline: over all pairs)")
    seed: int = opt(0, "seeds everything")
    threads: int = opt(1, "CPU threads for torch")


def reward_at_kl(points: list[FrontierPoint], kl: float) -> float:
    """Linear interpolation of reward against KL along ``points`` (sorted by KL); nan outside."""
    xs, ys = [p.kl for p in points], [p.reward for p in points]
    order = np.argsort(xs)
    xs, ys = np.asarray(xs)[order], np.asarray(ys)[order]
    return float(np.interp(kl, xs, ys)) if xs[0] <= kl <= xs[-1] else float("nan")


def run_iterative_lab(options: IterativeLabOptions) -> list[FrontierPoint]:
    with torch_threads(options.threads):
        tick = time.perf_counter()
        out = Path(options.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        o = options
        openings = load_openings()
        train_prompts, heldout = split_prompts(openings, o.rounds * o.prompts_per_round, o.eval_prompts,
                                               o.seed)
        judge_prompts, _ = split_prompts(openings, o.judge_prompts, o.eval_prompts, o.seed + 1)
        (out / "eval_prompts.jsonl").write_text("".join(f'{{"prompt": {_json(p)}}}\n' for p in heldout))
        rm, num_judge_pairs = _train_judge(o, out, judge_prompts, heldout)
        points = _run_both(o, out, train_prompts, _common_config(o, out, str(rm.final_dir)))
        iterative = [p for p in points if p.method in ("pi_0", "iterative DPO")]
        offline = next(p for p in points if p.method == "offline DPO")
        matched = reward_at_kl(iterative, offline.kl)
        write_points_jsonl(points, out / "frontier.jsonl")
        plot_frontier(points, out / "frontier.png",
                      title="iterative vs offline DPO: held-out r* vs KL to pi_0")
        pairs_total = sum(p.extra.get("pairs", 0) for p in points if p.method == "iterative DPO")
        accuracy = rm.eval_history[-1]["eval/rewards/accuracies"] if rm.eval_history else float("nan")
        notes = [
            f"Judge: a reward model trained on {num_judge_pairs} labelled pairs of pi_0 samples; held-out "
            f"pair accuracy {accuracy:.3f}.",
            f"Judged pairs: iterative {int(pairs_total)} over {o.rounds} rounds, offline "
            f"{int(offline.extra.get('pairs', 0))}.",
            f"At the offline run's KL ({offline.kl:.2f} nats) the iterative curve reaches "
            f"r* = {matched:+.4f} (offline: {offline.reward:+.4f}).",
            f"Whole experiment: {time.perf_counter() - tick:.0f} s with {o.threads} thread(s).",
        ]
        write_frontier_report(points, out / "report.md",
                              title="preftune lab iterate: iterative vs offline DPO",
                              intro=__doc__.split("\n\n", 1)[1], settings=dataclasses.asdict(options),
                              command=command_line("preftune lab iterate", options), notes=notes)
        return points


def _train_judge(o: IterativeLabOptions, out: Path, judge_prompts: list[str], heldout: list[str]):
    """The judge r_phi: a reward model on the demo's offline pairs of pi_0 samples; returns its training
    result and the number of pairs it learnt from."""
    from preftune.methods.reward import train_reward
    from preftune.model.load import load_model, load_tokenizer

    tokenizer, reference = load_tokenizer("embedded"), load_model("embedded").eval()
    demo = DemoOptions(seed=o.seed, max_new_tokens=o.max_new_tokens)
    pairs = labelled_pairs(reference, tokenizer, judge_prompts, demo, TRAIN_STREAM)
    judge_file = write_pairs_jsonl(pairs, out / "judge_pairs.jsonl")
    heldout_pairs = write_pairs_jsonl(labelled_pairs(reference, tokenizer, heldout * o.eval_samples, demo,
                                                     HELDOUT_STREAM), out / "judge_heldout_pairs.jsonl")
    shutil.rmtree(out / "judge", ignore_errors=True)
    rm = train_reward({"train_file": str(judge_file), "eval_file": str(heldout_pairs),
                       "output_dir": str(out / "judge"), "epochs": 2.0,
                       "learning_rate": 1e-3, "batch_size": 16, "max_length": 256, "max_prompt_length": 128,
                       "gradient_checkpointing": False, "progress_bar": False, "seed": o.seed})
    return rm, len(pairs)


def _common_config(o: IterativeLabOptions, out: Path, judge: str) -> dict[str, Any]:
    """The ``train_iterative`` settings both runs share."""
    return {
        "samples_per_prompt": o.samples_per_prompt, "max_new_tokens": o.max_new_tokens, "judge": judge,
        "eval_file": str(out / "eval_prompts.jsonl"), "eval_reward": "sentiment",
        "eval_samples": o.eval_samples, "seed": o.seed, "reference": "initial",
        "dpo": {"loss_params": {"beta": o.beta}, "learning_rate": o.learning_rate, "epochs": o.epochs,
                "batch_size": 16, "warmup_ratio": 0.1, "gradient_checkpointing": False, "progress_bar": False,
                "max_length": 256, "max_prompt_length": 128, "reference_cache_dir": str(out / "cache")},
    }


def _run_both(o: IterativeLabOptions, out: Path, train_prompts: list[str],
              common: dict[str, Any]) -> list[FrontierPoint]:
    """The iterative run (a point per round, pi_0 first) and the offline run (its final point)."""
    from preftune.methods.iterate import train_iterative

    points: list[FrontierPoint] = []
    runs = (("iterative DPO", {"rounds": o.rounds, "prompts_per_round": o.prompts_per_round}),
            ("offline DPO", {"rounds": 1, "prompts_per_round": o.rounds * o.prompts_per_round}))
    for label, values in runs:
        run_dir = out / label.split()[0]
        shutil.rmtree(run_dir, ignore_errors=True)
        result = train_iterative({**common, **values, "output_dir": str(run_dir)}, prompts=train_prompts)
        for row in result.rounds:
            if label == "offline DPO" and row["round"] == 0:
                continue  # pi_0 is the same point in both runs
            points.append(FrontierPoint(
                "pi_0" if row["round"] == 0 else label, f"round {row['round']}", row["eval/reward"],
                row["eval/reward_stderr"], row["eval/kl"], row["eval/kl_stderr"],
                row["eval/kl"] / max(row["eval/generation_length"], 1e-9), None,
                int(row.get("train_tokens", 0)), int(row.get("sample_tokens", 0)),
                float(row.get("train_wall_time_s", 0.0)),
                {k: float(row[k]) for k in ("pairs", "ties", "mean_judge_score") if k in row}))
    return points


def _json(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_options_parser(IterativeLabOptions, "preftune lab iterate",
                                  "Iterative DPO vs offline DPO on the same number of judged pairs "
                                  "(embedded model).")
    options = IterativeLabOptions(**vars(parser.parse_args(argv)))
    points = run_iterative_lab(options)
    print(format_frontier_table(points))
    print(f"report: {Path(options.output_dir) / 'report.md'}")
    return 0
