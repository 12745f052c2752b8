"""``preftune demo``: the whole DPO pipeline at small scale, offline, deterministic for a seed.

1. pi_ref = the embedded pretrained TinyStories model (it plays the SFT model);
2. prompts x = story openings; two continuations y1, y2 ~ pi_ref(. | x) per training prompt;
3. a simulated annotator with ground truth r*(x, y) = VADER sentiment of y labels each pair by a
   Bradley-Terry draw, P(y1 > y2) = sigmoid((r*(y1) - r*(y2)) / T)
   (:mod:`preftune.rewards.annotator`);
4. pi_theta is trained from pi_ref with DPO (:func:`preftune.methods.dpo.train_dpo`),
       L = -log sigmoid(beta [log pi_theta(y_w|x)/pi_ref(y_w|x) - log pi_theta(y_l|x)/pi_ref(y_l|x)]);
5. on held-out prompts: mean r* of samples of pi_ref and pi_theta (same seeds), the win rate of
   pi_theta over pi_ref under r* (ties count 1/2), KL(pi_theta || pi_ref) estimated from samples of
   pi_theta, and the accuracy of the implicit reward beta log(pi_theta / pi_ref) on held-out pairs
   labelled like the training pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from preftune.data.openings import load_openings, split_prompts
from preftune.lab.options import build_options_parser, opt
from preftune.lab.options import command_line as options_command_line
from preftune.lab.plots import plot_reward_histogram, plot_training
from preftune.lab.report import format_summary, write_report, write_samples
from preftune.lab.results import PolicyEvaluation
from preftune.model.generation import kl_estimate, sample_continuations, win_rate
from preftune.model.load import load_model, load_tokenizer, torch_threads
from preftune.rewards.annotator import LabelledPair, annotate, write_pairs_jsonl
from preftune.rewards.judges import sentiment
from preftune.rewards.sampling import sample_and_score
from preftune.stats import mean_stderr

__all__ = ["DemoOptions", "DemoResult", "build_parser", "command_line", "labelled_pairs", "main", "run_demo"]

# independent random streams derived from the one seed
TRAIN_STREAM, HELDOUT_STREAM, EVAL_STREAM = 0, 1, 2


def stream_seed(seed: int, stream: int) -> int:
    return seed + 1_000_003 * stream


@dataclass
class DemoOptions:
    """Every knob of the demo; each is a ``--flag`` of ``preftune demo`` (help text in the metadata)."""

    output_dir: str = opt("runs/demo", "where the data, model, metrics, plots and report.md go")
    model: str = opt("embedded", "pi_ref: a local model directory, or 'embedded' (stories260K)")
    num_prompts: int = opt(640, "N: training prompts, two samples of pi_ref each")
    eval_prompts: int = opt(64, "held-out prompts (never trained on)")
    eval_samples: int = opt(4, "per held-out prompt: samples of each model (before / after) and labelled "
                               "pairs")
    temperature: float = opt(1.0, "sampling temperature tau of both models (the KL estimate needs 1)")
    max_new_tokens: int = opt(48, "length limit of every sampled continuation, in tokens")
    judge_temperature: float = opt(0.1, "annotator noise T in sigmoid((r1 - r2) / T); 0 = always the "
                                        "higher r*")
    beta: float = opt(0.1, "DPO beta (strength of the KL anchor to pi_ref)")
    learning_rate: float = opt(1e-4, "peak learning rate (AdamW, 10%% warmup, linear decay)")
    steps: int = opt(120, "optimizer steps (120 x 16 pairs = 3 epochs of the default 640 pairs)")
    batch_size: int = opt(16, "preference pairs per step")
    seed: int = opt(0, "seeds the prompt split, sampling, labels and training")
    num_examples: int = opt(6, "example continuations shown in the report")
    threads: int = opt(1, "CPU threads for torch; 1 is fastest for this tiny model and robust to a busy "
                          "machine")
    progress_bar: bool = opt(True, "show the training progress bar")

    def __post_init__(self) -> None:
        checks = {"num_prompts": self.num_prompts >= 1, "eval_prompts": self.eval_prompts >= 1,
                  "eval_samples": self.eval_samples >= 1, "temperature": self.temperature > 0,
                  "max_new_tokens": self.max_new_tokens >= 1,
                  "judge_temperature": self.judge_temperature >= 0,
                  "beta": self.beta > 0, "learning_rate": self.learning_rate > 0, "steps": self.steps >= 1,
                  "batch_size": self.batch_size >= 1, "threads": self.threads >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"demo: {name} out of range: {getattr(self, name)!r}")


DemoResult = PolicyEvaluation  # the demo's figures; the name predates eval.results


def command_line(options: DemoOptions) -> str:
    """The ``preftune demo`` command that reproduces ``options`` (flags that differ from the defaults)."""
    return options_command_line("preftune demo", options)


def labelled_pairs(model: nn.Module, tokenizer: Any, prompts: list[str], options: DemoOptions,
                   stream: int) -> list[LabelledPair]:
    """Two samples of pi_ref per prompt, labelled by the annotator; pairs the trainer cannot use
    (identical or empty continuations) are dropped."""
    seed = stream_seed(options.seed, stream)
    samples = sample_continuations(model, tokenizer, prompts, num_samples=2, temperature=options.temperature,
                                   max_new_tokens=options.max_new_tokens, seed=seed)
    usable = [(p, a.text, b.text) for p, (a, b) in zip(prompts, samples)
              if a.text != b.text and a.text.strip() and b.text.strip()]
    rng = np.random.default_rng(seed)
    return annotate([u[0] for u in usable], [u[1] for u in usable], [u[2] for u in usable],
                    options.judge_temperature, rng)


def _agreement(pairs: Sequence[LabelledPair]) -> float:
    decided = [p for p in pairs if p.chosen_reward != p.rejected_reward]
    return sum(p.chosen_reward > p.rejected_reward for p in decided) / max(len(decided), 1)


def run_demo(options: DemoOptions) -> PolicyEvaluation:
    """Run the pipeline of the module docstring; write everything under ``options.output_dir``.
    torch's thread count is set to ``options.threads`` for the run and restored afterwards."""
    with torch_threads(options.threads):
        return _run_pipeline(options)


def _run_pipeline(options: DemoOptions) -> PolicyEvaluation:
    from preftune.methods.dpo import train_dpo

    start = time.perf_counter()
    times: dict[str, float] = {}
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(options.model)
    reference = load_model(options.model).eval()
    train_prompts, heldout_prompts = split_prompts(load_openings(), options.num_prompts, options.eval_prompts,
                                                   options.seed)

    # 1-3: sample pairs from pi_ref and label them with the simulated annotator
    tick = time.perf_counter()
    train_pairs = labelled_pairs(reference, tokenizer, train_prompts, options, TRAIN_STREAM)
    # eval_samples labelled pairs per held-out prompt
    eval_pairs = labelled_pairs(reference, tokenizer, heldout_prompts * options.eval_samples, options,
                                HELDOUT_STREAM)
    train_file = write_pairs_jsonl(train_pairs, out / "train_pairs.jsonl")
    eval_file = write_pairs_jsonl(eval_pairs, out / "heldout_pairs.jsonl")
    times["sample + label"] = time.perf_counter() - tick

    # 4: DPO from pi_ref; metrics.jsonl and final/ land in the demo's output directory
    tick = time.perf_counter()
    run = train_dpo(_dpo_config(options, train_file, eval_file, out))
    times["train"] = time.perf_counter() - tick

    # 5: evaluate on held-out prompts, both models with the same sampling seeds
    tick = time.perf_counter()
    policy = load_model(str(run.train.final_dir)).eval()
    eval_seed = stream_seed(options.seed, EVAL_STREAM)
    kwargs = dict(num_samples=options.eval_samples, temperature=options.temperature,
                  max_new_tokens=options.max_new_tokens, seed=eval_seed)
    before = sample_and_score(reference, tokenizer, heldout_prompts, sentiment, **kwargs)
    after = sample_and_score(policy, tokenizer, heldout_prompts, sentiment, **kwargs)
    kl = kl_estimate(policy, reference, after.samples)
    times["evaluate"] = time.perf_counter() - tick

    files = {
        "report": out / "report.md", "metrics": out / "metrics.jsonl", "train_pairs": train_file,
        "heldout_pairs": eval_file, "samples": out / "samples.jsonl", "training_plot": out / "training.png",
        "reward_plot": out / "rewards.png", "result": out / "result.json", "model": run.train.final_dir,
    }
    # the Trainer's step_plan, one process
    epoch_steps = math.ceil(len(run.data.train.pairs) / options.batch_size)
    plot_training(run.train.history, run.train.eval_history, files["training_plot"], epoch_steps=epoch_steps)
    plot_reward_histogram(before.rewards, after.rewards, files["reward_plot"])
    write_samples(before.samples, after.samples, before.rewards, after.rewards, files["samples"])
    result = _demo_result(run, before, after, kl, train_pairs, len(eval_pairs), out, files, times, start)
    k = options.eval_samples
    # each prompt's first sample
    examples = list(zip(before.samples[::k], after.samples[::k]))[: options.num_examples]
    write_report(result, dataclasses.asdict(options), examples, files["report"], command_line(options))
    files["result"].write_text(result.to_json() + "\n", encoding="utf-8")
    return result


def _dpo_config(options: DemoOptions, train_file: Path, eval_file: Path, out: Path) -> dict[str, Any]:
    """The DPO run of step 4: from pi_ref, held-out evaluation every steps / 5, into ``out``."""
    return {
        "model": options.model, "train_file": str(train_file), "eval_file": str(eval_file),
        "output_dir": str(out), "loss": "sigmoid", "loss_params": {"beta": options.beta},
        "learning_rate": options.learning_rate, "max_steps": options.steps, "batch_size": options.batch_size,
        "warmup_ratio": 0.1, "lr_scheduler": "linear", "seed": options.seed,
        "logging_steps": max(1, options.steps // 25), "eval_steps": max(1, options.steps // 5),
        "eval_on_start": True,  # a held-out point at step 0: pi_ref itself
        "max_length": 256, "max_prompt_length": 128, "progress_bar": options.progress_bar,
        "gradient_checkpointing": False,  # a 260K-parameter model's activations are tiny: skip the recompute
        "overwrite": True,  # the demo's directory is its own: a second demo replaces the first
    }


def _demo_result(run: Any, before: Any, after: Any, kl: Any, train_pairs: Sequence[LabelledPair],
                 num_eval_pairs: int, out: Path, files: dict[str, Any], times: dict[str, float],
                 start: float) -> PolicyEvaluation:
    """The figures of step 5 (rewards before / after, win rate, KL, implicit-reward accuracies) and of
    the run (``start``: its ``time.perf_counter()``)."""
    mean_before, se_before = mean_stderr(before.rewards)
    mean_after, se_after = mean_stderr(after.rewards)
    held = run.train.eval_history[-1] if run.train.eval_history else {}
    last = run.train.history[-1] if run.train.history else {}
    return PolicyEvaluation(
        reward_before=mean_before, reward_before_stderr=se_before, reward_after=mean_after,
        reward_after_stderr=se_after, win_rate=win_rate(after.rewards, before.rewards), kl=kl.mean,
        kl_stderr=kl.stderr, kl_per_token=kl.per_token,
        heldout_accuracy=float(held.get("eval/rewards/accuracies", float("nan"))),
        train_accuracy=float(last.get("rewards/accuracies", float("nan"))),
        label_agreement=_agreement(train_pairs), num_train_pairs=len(train_pairs),
        num_eval_pairs=num_eval_pairs, num_eval_samples=len(after.samples),
        wall_time_s=time.perf_counter() - start, stage_times_s=times,
        output_dir=str(out), files={k: str(v) for k, v in files.items()},
    )


def build_parser() -> argparse.ArgumentParser:
    return build_options_parser(
        DemoOptions, "preftune demo",
        "Sample story continuations from the embedded model, label them with a simulated sentiment "
        "annotator, train with DPO, and measure the effect on held-out prompts.",
        short={"num_prompts": "-n", "output_dir": "-o"})


def main(argv: list[str] | None = None) -> int:
    """``preftune demo [--flags]``: run the demo and print a summary table."""
    args = build_parser().parse_args(argv)
    result = run_demo(DemoOptions(**vars(args)))
    print(format_summary(result))
    return 0
