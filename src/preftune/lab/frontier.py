"""``preftune lab frontier``: the DPO paper's reward-vs-KL frontier (Rafailov et al. 2023, Fig. 2) at
small scale, offline, on the embedded model and the demo's ground truth.

pi_ref = the embedded TinyStories model; r*(x, y) = VADER sentiment of the continuation. From the
same N labelled pairs (two samples of pi_ref per prompt, Bradley-Terry labels from r*, as in the
demo) it trains:

* DPO for several beta, and IPO for several tau (``preftune dpo``, losses ``sigmoid`` / ``ipo``);
* preferred-FT: SFT on the chosen completions (``preftune sft``);
* a Bradley-Terry reward model r_phi (``preftune reward``), then
* PPO with a KL penalty for several coefficients, once against r* (the oracle) and once
  against r_phi (``preftune ppo``); and
* best-of-N sampling from pi_ref ranked by r_phi, N in 2..64 (KL = log N - (N - 1) / N).

Every policy is placed on held-out prompts at (KL(pi || pi_ref) per sequence from its samples,
mean r* of its samples), with standard errors, beside the compute it cost. Outputs:
``frontier.jsonl`` (a point per run), ``frontier.png``, ``report.md``, one directory per run.
Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.openings import load_openings, split_prompts
from preftune.lab.demo import HELDOUT_STREAM, TRAIN_STREAM, DemoOptions, labelled_pairs, stream_seed
from preftune.lab.options import build_options_parser, command_line, opt
from preftune.lab.pareto import FrontierPoint, best_of_n_kl, best_of_n_rewards, write_points_jsonl
from preftune.lab.plots import plot_frontier
from preftune.lab.report import format_frontier_table, write_frontier_report
from preftune.model.generation import kl_estimate, sample_continuations, win_rate
from preftune.model.load import load_model, load_tokenizer, torch_threads
from preftune.rewards.annotator import sentiment_reward, write_pairs_jsonl
from preftune.rewards.judges import sentiment
from preftune.rewards.sampling import ScoredSamples, sample_and_score
from preftune.stats import mean_stderr

EVAL_STREAM, BEST_OF_N_STREAM = 2, 3


@dataclass
class FrontierOptions:
    """Every knob of the frontier experiment; each is a ``--flag`` of ``preftune lab frontier``."""

    output_dir: str = opt("runs/frontier",
                          "where the data, runs, frontier.jsonl, frontier.png and report.md go")
    quick: bool = opt(False,
                      "the quick setting (fewer prompts, shorter samples, fewer runs): < 15 min on 2 cores")
    model: str = opt("embedded", "pi_ref: a local model directory, or 'embedded' (stories260K)")
    num_prompts: int = opt(640,
                           "training prompts: two samples of pi_ref each, labelled; PPO's rollout prompts")
    eval_prompts: int = opt(64, "held-out prompts every policy is measured on")
    eval_samples: int = opt(4, "samples per held-out prompt and policy")
    max_new_tokens: int = opt(48, "length limit of every sample, in tokens")
    judge_temperature: float = opt(0.1,
                                   "annotator noise T: P(y1 preferred) = sigmoid((r*(y1) - r*(y2)) / T)")
    dpo_betas: str = opt("0.03,0.1,0.3,1.0", "DPO beta values (comma-separated; empty = no DPO runs)")
    ipo_taus: str = opt("0.1,0.5", "IPO tau values (comma-separated; empty = none)")
    ppo_kl_coefs: str = opt("0.02,0.05,0.1,0.3", "PPO KL coefficients, each run with r* and with r_phi")
    best_of_n: str = opt("2,4,8,16,32,64", "best-of-N sizes (ranked by the reward model)")
    epochs: float = opt(3.0, "epochs over the labelled pairs for DPO, IPO and preferred-FT")
    batch_size: int = opt(16, "pairs (or examples, rollouts) per optimizer step")
    learning_rate: float = opt(1e-4, "peak learning rate of DPO, IPO and preferred-FT "
                                     "(10%% warmup, linear decay)")
    ppo_rounds: int = opt(20, "PPO rounds (rollout + update), each over rollout_batch_size prompts")
    rollout_batch_size: int = opt(64, "PPO prompts per round")
    ppo_learning_rate: float = opt(3e-4, "PPO learning rate")
    rm_epochs: float = opt(2.0, "epochs of reward-model training")
    rm_learning_rate: float = opt(1e-3, "reward-model learning rate")
    seed: int = opt(0, "seeds the prompt split, samples, labels and every run")
    threads: int = opt(1, "CPU threads for torch (1 is fastest for the tiny model)")
    progress_bar: bool = opt(False, "show each run's training progress bar")


# the quick setting: overrides of the values the user left at their defaults
QUICK: dict[str, Any] = {"num_prompts": 256, "eval_prompts": 32, "max_new_tokens": 24,
                         "dpo_betas": "0.05,0.2,1.0", "ipo_taus": "0.3", "ppo_kl_coefs": "0.03,0.1,0.3",
                         "best_of_n": "2,4,8,16,32,64", "ppo_rounds": 8, "rollout_batch_size": 32}


def resolve_options(options: FrontierOptions) -> FrontierOptions:
    """Apply :data:`QUICK` to the fields the user left at their defaults, when ``quick`` is set."""
    if not options.quick:
        return options
    defaults = FrontierOptions()
    changes = {k: v for k, v in QUICK.items() if getattr(options, k) == getattr(defaults, k)}
    return dataclasses.replace(options, **changes)


def _numbers(text: str, kind: type = float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"lab frontier: expected comma-separated numbers, got {text!r}") from None


class FrontierLab:
    """One frontier experiment: shared data, reward model and evaluation, then a point per run."""

    def __init__(self, options: FrontierOptions):
        self.o = options
        self.out = Path(options.output_dir)
        self.tokenizer = load_tokenizer(options.model)
        self.reference = load_model(options.model).eval()
        self.train_prompts, self.heldout_prompts = split_prompts(
            load_openings(), options.num_prompts, options.eval_prompts, options.seed)
        self.points: list[FrontierPoint] = []
        self.notes: list[str] = []
        self.baseline: ScoredSamples | None = None

    # -- shared pieces ----------------------------------------------------------------------
    def _common(self, name: str) -> dict[str, Any]:
        run_dir = self.out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the lab owns its run directories: each run starts fresh
        return {"model": self.o.model, "output_dir": str(run_dir), "seed": self.o.seed,
                "batch_size": self.o.batch_size, "progress_bar": self.o.progress_bar,
                "gradient_checkpointing": False, "max_prompt_length": 128, "logging_steps": 10}

    def _sample(self, model, stream: int, num_samples: int) -> ScoredSamples:
        return sample_and_score(model, self.tokenizer, self.heldout_prompts, sentiment,
                                num_samples=num_samples, temperature=1.0,
                                max_new_tokens=self.o.max_new_tokens, seed=stream_seed(self.o.seed, stream))

    def prepare_data(self) -> None:
        """Labelled pairs of pi_ref samples (train and held-out) and pi_ref's own held-out point."""
        tick = time.perf_counter()
        demo = DemoOptions(seed=self.o.seed, temperature=1.0, max_new_tokens=self.o.max_new_tokens,
                           judge_temperature=self.o.judge_temperature)
        pairs = labelled_pairs(self.reference, self.tokenizer, self.train_prompts, demo, TRAIN_STREAM)
        heldout = labelled_pairs(self.reference, self.tokenizer, self.heldout_prompts * self.o.eval_samples,
                                 demo, HELDOUT_STREAM)
        self.train_file = write_pairs_jsonl(pairs, self.out / "train_pairs.jsonl")
        self.heldout_file = write_pairs_jsonl(heldout, self.out / "heldout_pairs.jsonl")
        tokens = sum(len(self.tokenizer(p.chosen + p.rejected, add_special_tokens=False)["input_ids"])
                     for p in pairs)
        self.data_time = time.perf_counter() - tick
        self.notes.append(f"DPO, IPO, preferred-FT and the reward model learn from the same {len(pairs)} "
                          f"labelled pairs (two samples of pi_ref per prompt, about {tokens} sampled tokens, "
                          f"{self.data_time:.0f} s to sample and label); that cost is not in their rows.")
        self.baseline = self._sample(self.reference, EVAL_STREAM, self.o.eval_samples)
        mean, se = mean_stderr(self.baseline.rewards)
        self.points.append(FrontierPoint("pi_ref", "-", mean, se, 0.0, 0.0, 0.0, 0.5, 0, 0, 0.0, {}))

    def evaluate(self, method: str, setting: str, model_dir: Path, wall: float, train_tokens: int,
                 sample_tokens: int, extra: dict[str, float] | None = None) -> FrontierPoint:
        """Place a trained policy: held-out samples (same seeds as pi_ref's), r*, KL, win rate."""
        policy = load_model(str(model_dir)).eval()
        scored = self._sample(policy, EVAL_STREAM, self.o.eval_samples)
        kl = kl_estimate(policy, self.reference, scored.samples)
        mean, se = mean_stderr(scored.rewards)
        point = FrontierPoint(method, setting, mean, se, kl.mean, kl.stderr, kl.per_token,
                              win_rate(scored.rewards, self.baseline.rewards), train_tokens, sample_tokens,
                              wall, extra or {})
        self.points.append(point)
        return point

    # -- the methods ------------------------------------------------------------------------
    def run_dpo(self, loss: str, beta: float) -> None:
        from preftune.methods.dpo import train_dpo

        method = "DPO" if loss == "sigmoid" else loss.upper()
        config = {**self._common(f"{method.lower()}-{beta:g}"), "train_file": str(self.train_file),
                  "max_length": 256, "loss": loss, "loss_params": {"beta": beta}, "epochs": self.o.epochs,
                  "learning_rate": self.o.learning_rate, "warmup_ratio": 0.1,
                  "reference_cache_dir": str(self.out / "reference_cache")}
        tick = time.perf_counter()
        run = train_dpo(config)
        name = "beta" if loss == "sigmoid" else "tau"
        self.evaluate(method, f"{name}={beta:g}", run.train.final_dir, time.perf_counter() - tick,
                      run.train.train_tokens, 0)

    def run_preferred_ft(self) -> None:
        from preftune.methods.sft import train_sft

        config = {**self._common("preferred-ft"), "train_file": str(self.train_file), "max_length": 256,
                  "epochs": self.o.epochs,
                  "learning_rate": self.o.learning_rate, "warmup_ratio": 0.1}
        tick = time.perf_counter()
        run = train_sft(config)
        self.evaluate("preferred-FT", f"{self.o.epochs:g} epochs", run.train.final_dir,
                      time.perf_counter() - tick, run.train.train_tokens, 0)

    def train_reward_model(self) -> Callable[[list[str], list[str]], list[float]]:
        from preftune.methods.reward import train_reward
        from preftune.rewards.reward_model import load_reward_model, score

        config = {**self._common("reward-model"), "train_file": str(self.train_file), "max_length": 256,
                  "eval_file": str(self.heldout_file), "epochs": self.o.rm_epochs,
                  "learning_rate": self.o.rm_learning_rate, "warmup_ratio": 0.1}
        tick = time.perf_counter()
        result = train_reward(config)
        self.rm_time, self.rm_tokens = time.perf_counter() - tick, result.train_tokens
        accuracy = result.eval_history[-1]["eval/rewards/accuracies"] if result.eval_history else float("nan")
        self.notes.append(f"The reward model r_phi (Bradley-Terry, {self.rm_time:.0f} s, "
                          f"{self.rm_tokens} tokens) ranks {accuracy:.3f} of the held-out labelled pairs "
                          "correctly; PPO (reward model) and best-of-N use it, and its cost is not in their "
                          "rows.")
        model = load_reward_model(str(result.final_dir), pad_token_id=self.tokenizer.pad_token_id).eval()
        return lambda prompts, completions: score(model, prompts, completions, tokenizer=self.tokenizer,
                                                  max_length=256, max_prompt_length=128)

    def run_ppo(self, kl_coef: float, reward_fn, label: str) -> None:
        from preftune.methods.ppo import train_ppo

        per_round = 2 * math.ceil(self.o.rollout_batch_size / self.o.batch_size)  # 2 PPO epochs x minibatches
        config = {**self._common(f"ppo-{label}-{kl_coef:g}"), "rollout_batch_size": self.o.rollout_batch_size,
                  "num_rollouts": self.o.ppo_rounds, "ppo_epochs": 2,
                  "learning_rate": self.o.ppo_learning_rate, "max_new_tokens": self.o.max_new_tokens,
                  "kl_coef": kl_coef, "logging_steps": per_round}
        tick = time.perf_counter()
        run = train_ppo(config, prompts=self.train_prompts, reward_fn=reward_fn)
        sampled = int(sum(r["rollout/length"] for r in run.train.history) * self.o.rollout_batch_size)
        method = "PPO (oracle reward)" if label == "oracle" else "PPO (reward model)"
        self.evaluate(method, f"kl_coef={kl_coef:g}", run.train.final_dir, time.perf_counter() - tick,
                      run.train.train_tokens, sampled)

    def run_best_of_n(self, ns: Sequence[int], proxy_fn) -> None:
        """Candidates of pi_ref per held-out prompt, ranked by r_phi; r* of the pick."""
        if not ns:
            return
        tick = time.perf_counter()
        m = max(ns)
        groups = sample_continuations(self.reference, self.tokenizer, self.heldout_prompts, num_samples=m,
                                      temperature=1.0, max_new_tokens=self.o.max_new_tokens,
                                      seed=stream_seed(self.o.seed, BEST_OF_N_STREAM))
        flat = [s for g in groups for s in g]
        proxy = np.asarray(proxy_fn([s.prompt for s in flat], [s.text for s in flat]))
        proxy = proxy.reshape(len(groups), m)
        true = np.asarray(sentiment_reward(s.text for s in flat)).reshape(len(groups), m)
        lengths = np.asarray([len(s.completion_ids) for s in flat]).reshape(len(groups), m)
        wall_per_candidate = (time.perf_counter() - tick) / m
        k = self.o.eval_samples
        for n, picked in best_of_n_rewards(proxy, true, ns).items():
            mean, se = mean_stderr(picked)
            kl = best_of_n_kl(n)
            rate = win_rate(np.repeat(picked, k).tolist(), self.baseline.rewards)
            self.points.append(FrontierPoint("best-of-N", f"N={n}", mean, se, kl, 0.0,
                                             kl / float(lengths[:, 0].mean()), rate, 0,
                                             int(lengths[:, :n].sum()), wall_per_candidate * n, {}))

    # -- the whole experiment ---------------------------------------------------------------
    def run(self) -> list[FrontierPoint]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        for beta in _numbers(self.o.dpo_betas):
            self.run_dpo("sigmoid", beta)
        for tau in _numbers(self.o.ipo_taus):
            self.run_dpo("ipo", tau)
        self.run_preferred_ft()
        proxy = self.train_reward_model()
        for coef in _numbers(self.o.ppo_kl_coefs):
            self.run_ppo(coef, sentiment, "oracle")
            self.run_ppo(coef, proxy, "rm")
        self.run_best_of_n(_numbers(self.o.best_of_n, int), proxy)
        return self.points


INTRO = (
    "The reward-vs-KL frontier of the DPO paper (Rafailov et al. 2023, Fig. 2) at small scale. pi_ref is "
    "the embedded TinyStories model; the ground truth r*(x, y) is the VADER sentiment of the continuation. "
    "DPO, IPO, preferred-FT (SFT on the chosen completions) and a Bradley-Terry reward model r_phi learn "
    "from the same labelled pairs of pi_ref samples; PPO with a KL penalty optimises r* itself (the oracle) "
    "or r_phi; best-of-N ranks N samples of pi_ref by r_phi. Each point: mean r* and KL(pi || pi_ref) per "
    "sequence from samples on held-out prompts (same seeds for every policy), ± one standard error; "
    "best-of-N's KL is log N - (N-1)/N. Train tokens are tokens through forward + backward passes; sample "
    "tokens are tokens generated for training (rollouts) or candidates (best-of-N)."
)


def run_frontier(options: FrontierOptions) -> list[FrontierPoint]:
    """Run every method, write ``frontier.jsonl``, ``frontier.png`` and ``report.md``; return the
    points."""
    options = resolve_options(options)
    with torch_threads(options.threads):
        tick = time.perf_counter()
        lab = FrontierLab(options)
        points = lab.run()
        out = lab.out
        write_points_jsonl(points, out / "frontier.jsonl")
        plot_frontier(points, out / "frontier.png")
        lab.notes.append(f"Whole experiment: {time.perf_counter() - tick:.0f} s with {options.threads} "
                         "thread(s).")
        write_frontier_report(points, out / "report.md", title="preftune lab frontier: reward vs KL",
                              intro=INTRO, settings=dataclasses.asdict(options),
                              command=command_line("preftune lab frontier", options), notes=lab.notes)
        return points


def main(argv: list[str] | None = None) -> int:
    parser = build_options_parser(FrontierOptions, "preftune lab frontier",
                                  "Reward vs KL of DPO, IPO, PPO (oracle and reward model), preferred-FT and "
                                  "best-of-N on the embedded model, as in the DPO paper's Figure 2.")
    options = FrontierOptions(**vars(parser.parse_args(argv)))
    points = run_frontier(options)
    print(format_frontier_table(points))
    print(f"report: {Path(options.output_dir) / 'report.md'}")
    return 0
