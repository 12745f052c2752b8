"""Iterative (online) DPO: rounds of sample -> judge -> build pairs -> DPO -> evaluate.

Round r (``output_dir/round_r/``), with pi_r the policy after round r (pi_0 = ``model``):

1. ``samples.jsonl``: k = ``samples_per_prompt`` completions of pi_{r-1} per prompt (this round's
   ``prompts_per_round`` prompts, in a seeded order; all prompts when unset);
2. judged by a reward (``judge``: ``sentiment``, a reward model directory, ``module:function``) or
   a pairwise judge (``pairwise_judge``; each sample's score is then its mean win probability
   against the prompt's other samples);
3. ``pairs.jsonl``: ``best_worst`` (the best against the worst sample of each prompt) or
   ``all_pairs`` (every pair whose score gap exceeds ``min_gap``); ties and identical texts are
   dropped and counted;
4. DPO (any registered loss, settings under ``dpo``) from pi_{r-1} against the round's reference:
   ``initial`` (pi_0 every round), ``previous`` (pi_{r-1}: the reference moves each round) or
   ``ema`` (TR-DPO's soft update ref_r = a * pi_{r-1} + (1 - a) * ref_{r-1}, a = ``reference_ema``,
   0.5 by default);
   the reference log-probs are precomputed and cached as in ``preftune dpo``;
5. ``eval.json``: on ``eval_file`` prompts (if given), the ``eval_reward`` of samples of pi_r and
   KL(pi_r || pi_0) from them.

Every file is written atomically; ``resume: true`` skips what a round already has and continues
its DPO run from its checkpoints, so an interrupted iteration finishes as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.data.rows import Prompt, as_prompt
from preftune.engine.accelerator import LaunchedProcesses, all_shares
from preftune.engine.config import build_config, check_ranges
from preftune.methods.iterate_pairs import PairStats, borda_scores, build_pairs
from preftune.model.hub import resolve_model_path
from preftune.rewards.judges import (
    RewardFunction,
    call_reward,
    check_takes_images,
    load_pairwise_judge,
    load_reward,
)

logger = logging.getLogger("preftune")
PAIR_STRATEGIES = ("best_worst", "all_pairs")
REFERENCE_UPDATES = ("initial", "previous", "ema")


@dataclass
class IterateConfig:
    """Settings of ``preftune iterate`` (see the module docstring); ``dpo`` holds DPO settings."""

    model: str = "embedded"  # pi_0: the policy of round 1 and the reference of 'initial'
    train_file: str | None = None  # prompt file(s): rows with a prompt, or preference rows
    eval_file: str | None = None  # held-out prompts, evaluated with eval_reward after every round
    output_dir: str = "runs/iterate"  # round_N/ (samples, pairs, the DPO run) and iterate.jsonl
    rounds: int = 3  # sample -> judge -> pairs -> DPO rounds
    samples_per_prompt: int = 4  # completions sampled per prompt and round (>= 2)
    prompts_per_round: int | None = None  # prompts sampled each round (default: all)
    temperature: float = 1.0  # sampling temperature of the rounds' completions
    max_new_tokens: int = 48  # length limit of each sampled completion
    judge: str | None = None  # a reward: sentiment, a reward-model directory or module:function
    pairwise_judge: str | None = None  # module:function (prompts, a, b) -> P(a better); Borda scores
    pair_strategy: str = "best_worst"  # best_worst (one pair per prompt) or all_pairs
    min_gap: float = 0.0  # score gaps up to this are ties (no pair)
    reference: str = "initial"  # each round's reference: initial (pi_0), previous (pi_r-1) or ema
    reference_ema: float | None = None  # ema's a; 0.5 when unset
    eval_reward: str | None = None  # the reward of the held-out evaluation (e.g. the ground truth)
    eval_samples: int = 4  # samples per held-out prompt
    seed: int = 0  # seeds the prompt order and sampling
    resume: bool = False  # continue the iteration in output_dir from its last complete step
    overwrite: bool = False  # replace an earlier iteration in output_dir
    skip_bad_rows: bool = False  # of the prompt files (the DPO rounds train on pairs built here)
    dpo: dict[str, Any] = field(default_factory=dict)  # the rounds' DPO settings (keys of preftune dpo)

    def __post_init__(self) -> None:
        checks = {"rounds": self.rounds >= 1, "samples_per_prompt": self.samples_per_prompt >= 2,
                  "prompts_per_round": self.prompts_per_round is None or self.prompts_per_round >= 1,
                  "temperature": self.temperature > 0, "max_new_tokens": self.max_new_tokens >= 1,
                  "min_gap": self.min_gap >= 0,
                  "reference_ema": self.reference_ema is None or 0 < self.reference_ema <= 1,
                  "eval_samples": self.eval_samples >= 1}
        check_ranges(self, checks)
        if self.reference_ema is not None and self.reference != "ema":
            raise ValueError("config: reference_ema has no effect without reference: ema; remove it")
        if self.pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"config: pair_strategy must be one of {', '.join(PAIR_STRATEGIES)}")
        if self.reference not in REFERENCE_UPDATES:
            raise ValueError(f"config: reference must be one of {', '.join(REFERENCE_UPDATES)}")
        if (self.judge is None) == (self.pairwise_judge is None):
            raise ValueError("config: set exactly one of judge (a reward) and pairwise_judge")
        if self.train_file is None:
            raise ValueError("config: train_file (the prompts) is required")
        if self.eval_file is not None and self.eval_reward is None:
            raise ValueError("config: eval_file needs eval_reward (e.g. sentiment, or a reward model "
                             "directory)")
        if self.resume and self.overwrite:
            raise ValueError("config: resume and overwrite exclude each other")
        for key in ("model", "train_file", "eval_file", "output_dir", "reference_model", "resume",
                    "overwrite"):
            if key in self.dpo:
                raise ValueError(f"config: dpo.{key} is set by iterate; set the top-level key instead")
        self.dpo_config(0, "-", str(Path(self.output_dir) / "round_1"))  # validates the DPO settings now

    def dpo_config(self, rnd: int, train_file: str, output_dir: str, policy: str | None = None,
                   reference_model: str | None = None):
        from preftune.methods.dpo import DPOConfig

        values = {"model": policy or self.model, "train_file": train_file, "output_dir": output_dir,
                  "seed": self.seed + rnd, "resume": self.resume, **self.dpo}
        # one tracker run per round (dpo.report_to), named <dpo.run_name>-round_N
        name = self.dpo.get("run_name")
        values["run_name"] = f"{name}-round_{rnd}" if name else f"round_{rnd}"
        if reference_model is not None:
            values["reference_model"] = reference_model
        return build_config(DPOConfig, values, source="config: dpo")


# -- rounds ------------------------------------------------------------------------------------------
def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ema_reference(policy_dir: Path, previous_ref: str, alpha: float, out: Path) -> Path:
    """A model directory with weights a * policy + (1 - a) * previous reference (TR-DPO soft update)."""
    from preftune.engine.checkpoint import write_atomically
    from preftune.model.load import load_model

    policy, ref = load_model(str(policy_dir)), load_model(previous_ref)
    with torch.no_grad():
        for p_ref, p_pol in zip(ref.parameters(), policy.parameters(), strict=True):
            p_ref.lerp_(p_pol, alpha)

    def fill(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (policy_dir / name).exists():
                shutil.copy(policy_dir / name, tmp / name)

    return write_atomically(out, fill)


@dataclass
class IterateResult:
    output_dir: Path
    rounds: list[dict[str, Any]]
    final_dir: Path


class Iteration:
    def __init__(self, config: IterateConfig, prompts: list[str | Prompt] | None = None,
                 reward_fn: RewardFunction | None = None, eval_reward: RewardFunction | None = None):
        from preftune.data.formats import read_prompts
        from preftune.engine.setup import check_run_paths, fit_max_length
        from preftune.model.load import load_tokenizer

        check_run_paths(config)
        self.config, self.out = config, Path(config.output_dir)
        # under torchrun / accelerate launch: the run's processes (each samples and judges its share)
        self.processes = LaunchedProcesses()
        self.tokenizer = load_tokenizer(config.model)
        skip = config.skip_bad_rows
        self.prompts = ([as_prompt(p) for p in prompts] if prompts is not None
                        else read_prompts(config.train_file, self.tokenizer, skip_bad_rows=skip))
        self.eval_prompts = (read_prompts(config.eval_file, self.tokenizer, skip_bad_rows=skip)
                             if config.eval_file else [])
        budgets = config.dpo_config(0, "-", str(self.out))
        fit_max_length(budgets)  # the DPO runs' budgets: sampled prompts are cut to the same length
        self.max_prompt_tokens = budgets.max_prompt_length
        self._initial = None  # pi_0, loaded for the first evaluation
        self.pairwise = load_pairwise_judge(config.pairwise_judge) if config.pairwise_judge else None
        self.reward = reward_fn or (load_reward(config.judge, what="config: judge") if config.judge else None)
        self.eval_reward = eval_reward or (load_reward(config.eval_reward, what="config: eval_reward")
                                           if config.eval_reward else None)
        self.images = self._image_inputs()

    def _image_inputs(self):
        """pi_0's :class:`~preftune.data.images.ImageInputs` when a prompt has images (every round's policy
        keeps its processor), else None; a text-only model with such prompts is one line."""
        from preftune.model.vision import load_image_inputs

        with_images = next((p for p in [*self.prompts, *self.eval_prompts] if p.images), None)
        if with_images is None:
            return None
        images = load_image_inputs(self.config.model, self.tokenizer)
        if images is None:
            raise ValueError(f"{with_images.origin or 'prompt'}: field 'images': model {self.config.model} "
                             "is text-only; prompts with images need an image-text model")
        judges = [(self.reward, "config: judge", 2), (self.pairwise, "config: pairwise_judge", 3)]
        if any(p.images for p in self.eval_prompts):
            judges.append((self.eval_reward, "config: eval_reward", 2))
        for fn, what, positional in judges:  # before anything is sampled
            if fn is not None:
                check_takes_images(fn, what, positional)
        return images

    def round_prompts(self, rnd: int) -> list[Prompt]:
        n = self.config.prompts_per_round or len(self.prompts)
        count = len(self.prompts)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed)).tolist()
        start = ((rnd - 1) * n) % count
        return [self.prompts[order[(start + i) % count]] for i in range(min(n, count))]

    def sample_and_judge(self, rnd: int, policy: str, directory: Path) -> dict[str, Any]:
        from preftune.model.generation import sample_continuations
        from preftune.model.load import load_model, load_tokenizer

        cfg = self.config
        prompts = self.round_prompts(rnd)
        groups = sample_continuations(load_model(policy).eval(), load_tokenizer(policy), prompts,
                                      num_samples=cfg.samples_per_prompt, temperature=cfg.temperature,
                                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919 * rnd,
                                      max_prompt_tokens=self.max_prompt_tokens,
                                      processes=(self.processes.index, self.processes.count),
                                      images=self.images)
        share, error = [], None
        try:  # this process's share: the prompts of its sampler batches
            share = [self._judged(i, prompt, group) for i, (prompt, group) in enumerate(zip(prompts, groups))
                     if group]
        except Exception as e:  # noqa: BLE001 - a judge's error on one process stops them all
            error = e
        judged = sorted(all_shares(share, error), key=lambda item: item[0])  # every process's share
        samples = [sample for _, sample, _ in judged]
        stats, rows = PairStats(), []
        for (i, _, _), sample in zip(judged, samples):
            rows += build_pairs(prompts[i], sample["completions"], sample["scores"], cfg.pair_strategy,
                                cfg.min_gap, stats)
        if self.processes.main:
            _write_jsonl(samples, directory / "samples.jsonl")
            # last: its presence means the round's data is whole
            _write_jsonl(rows, directory / "pairs.jsonl")
        self.processes.wait()
        mean_score = sum(sum(s["scores"]) for s in samples) / max(1, sum(len(s["scores"]) for s in samples))
        generated = sum(tokens for _, _, tokens in judged)
        return {**asdict(stats), "mean_judge_score": mean_score, "sample_tokens": generated}

    def _judged(self, index: int, prompt: Prompt, group: list[Any]) -> tuple[int, dict[str, Any], int]:
        """(prompt index, its samples and their scores, the tokens generated): one prompt's share."""
        texts = [s.text for s in group]
        if self.pairwise is not None:
            scores = borda_scores(self.pairwise, prompt, texts)
        else:
            scores = call_reward(self.reward, [prompt] * len(texts), texts, what="config: judge")
        images = prompt.images_field()
        return index, {"prompt": prompt.text, **images, "completions": texts, "scores": scores}, \
            sum(len(s.completion_ids) for s in group)

    def evaluate(self, rnd: int, policy: Path) -> dict[str, Any]:
        from preftune.model.generation import kl_estimate
        from preftune.model.load import load_model
        from preftune.rewards.sampling import sample_and_score
        from preftune.stats import mean_stderr

        cfg = self.config
        if self._initial is None:
            self._initial = load_model(cfg.model).eval()
        model = load_model(str(policy)).eval()
        scored = sample_and_score(model, self.tokenizer, self.eval_prompts, self.eval_reward,
                                  num_samples=cfg.eval_samples, temperature=1.0,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 17,
                                  max_prompt_tokens=self.max_prompt_tokens, images=self.images,
                                  what="config: eval_reward")
        kl = kl_estimate(model, self._initial, scored.samples, images=self.images)
        mean, se = mean_stderr(scored.rewards)
        return {"round": rnd, "reward": mean, "reward_stderr": se, "kl": kl.mean, "kl_stderr": kl.stderr,
                "generation_length": scored.generated_tokens / len(scored.samples)}

    def _eval_once(self, rnd: int, policy: Path, path: Path) -> dict[str, Any]:
        if not (self.config.resume and path.exists()):
            evaluation = self.evaluate(rnd, policy)  # every process: the same prompts, seeds and model
            if self.processes.main:
                path.write_text(json.dumps(evaluation, indent=2))
            self.processes.wait()
        return json.loads(path.read_text())

    def next_reference(self, rnd: int, policy: str, reference: str, directory: Path) -> str:
        """Round ``rnd``'s reference: pi_0 (initial), pi_{r-1} (previous) or the EMA of both (ema)."""
        rule = self.config.reference
        if rule == "previous":
            return policy
        if rule == "ema" and rnd > 1:
            if self.processes.main:
                ema_reference(Path(policy), reference, self.config.reference_ema or 0.5,
                              directory / "reference")
            self.processes.wait()
            return str(directory / "reference")
        return reference

    def run(self) -> IterateResult:
        cfg = self.config
        self._prepare_output_dir()
        policy, reference = cfg.model, cfg.model
        summary: list[dict[str, Any]] = []
        if self.eval_reward is not None and cfg.eval_file is not None:  # round 0: the starting model
            initial = Path(resolve_model_path(cfg.model))
            summary.append({"round": 0, **_eval_columns(self._eval_once(0, initial,
                                                                        self.out / "eval_round_0.json"))})
        for rnd in range(1, cfg.rounds + 1):
            row, policy, reference = self._round(rnd, policy, reference)
            summary.append(row)
            logger.info("round %d: %s", rnd, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in row.items() if k != "round"))
        if self.processes.main:
            _write_jsonl(summary, self.out / "iterate.jsonl")
        return IterateResult(self.out, summary, Path(policy))

    def _prepare_output_dir(self) -> None:
        """Make ``output_dir``; an earlier iteration there is continued (``resume``), removed
        (``overwrite``) or refused."""
        cfg = self.config
        previous = sorted(self.out.glob("round_*")) + sorted(self.out.glob("eval_round_0.json"))
        self.processes.wait()  # every process has looked before the main one removes anything
        if previous and not cfg.resume:
            if not cfg.overwrite:
                raise ValueError(f"output_dir {self.out} already holds an iteration "
                                 f"({previous[0].name}, ...); set resume: true to continue it, "
                                 "overwrite: true to replace it, or choose another")
            for path in previous if self.processes.main else ():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.processes.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.processes.wait()

    def _round(self, rnd: int, policy: str, reference: str) -> tuple[dict[str, Any], str, str]:
        """Round ``rnd`` from pi_{r-1} = ``policy``: its pairs (or, resuming, those it has), the
        reference after ``reference``, DPO, the evaluation; (its summary row, pi_r, its reference)."""
        cfg = self.config
        directory = self.out / f"round_{rnd}"
        directory.mkdir(exist_ok=True)
        row: dict[str, Any] = {"round": rnd}
        if cfg.resume and (directory / "pairs.jsonl").exists() and (directory / "round.json").exists():
            row.update(json.loads((directory / "round.json").read_text())["data"])
        else:
            row.update(self.sample_and_judge(rnd, policy, directory))
            if self.processes.main:
                (directory / "round.json").write_text(json.dumps({"data": row}))
            self.processes.wait()
        if row["pairs"] == 0:
            raise ValueError(f"{directory}: no pairs this round (all {row['ties']} ties); lower min_gap or "
                             "raise samples_per_prompt / temperature")
        reference = self.next_reference(rnd, policy, reference, directory)
        final = directory / "final"
        if not (cfg.resume and final.is_dir()):
            self._train(rnd, directory, policy, reference)
        if (directory / "train.json").exists():
            row.update(json.loads((directory / "train.json").read_text()))
        if self.eval_reward is not None and cfg.eval_file is not None:
            row.update(_eval_columns(self._eval_once(rnd, final, directory / "eval.json")))
        return row, str(final), reference

    def _train(self, rnd: int, directory: Path, policy: str, reference: str) -> None:
        """DPO of round ``rnd`` from ``policy`` against ``reference`` on the round's pairs, into
        ``directory``; its tokens and wall time in ``train.json``."""
        from preftune.methods.dpo import train_dpo

        dpo = self.config.dpo_config(rnd, str(directory / "pairs.jsonl"), str(directory), policy,
                                     None if reference == policy else reference)
        tick = time.perf_counter()
        trained = train_dpo(dpo).train
        if self.processes.main:
            (directory / "train.json").write_text(json.dumps(
                {"train_tokens": trained.train_tokens, "train_wall_time_s": time.perf_counter() - tick}))
        self.processes.wait()


def _eval_columns(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's values as ``eval/`` columns of a round's row (its round number left out)."""
    return {f"eval/{k}": v for k, v in evaluation.items() if k != "round"}


def train_iterative(config: IterateConfig | dict[str, Any], *, prompts: list[str | Prompt] | None = None,
                    reward_fn: RewardFunction | None = None, eval_reward: RewardFunction | None = None
                    ) -> IterateResult:
    """Run iterative DPO (see the module docstring). ``prompts``/``reward_fn``/``eval_reward`` override
    the config's files and judges from Python."""
    if isinstance(config, dict):
        values = dict(config)
        if prompts is not None:
            values.setdefault("train_file", "-")
        if reward_fn is not None and "judge" not in values and "pairwise_judge" not in values:
            values["judge"] = "<python callable>"  # names the reward_fn passed below; never loaded
        config = build_config(IterateConfig, values)
    return Iteration(config, prompts, reward_fn, eval_reward).run()


