"""``preftune lab vision``: DPO on an image-text model, offline, on 2 CPU cores.

1. A tiny LLaVA-style model (lab/vision_model.py: a random 2-layer ViT + projector + the embedded
   stories260K language model) and synthetic images (lab/shapes.py: coloured shapes on noise) with
   one-word questions about colour, shape and count.
2. SFT (``preftune sft``'s ``train_sft``) on correct answers: the vision tower learns from scratch.
3. For each of ``dpo_prompts`` held-out images, two answers sampled from the SFT model are labelled
   by the ground truth: a correct one beats a wrong one (pairs where both are right or both wrong
   carry no preference and are counted, not used).
4. Two arms from the SFT model (the reference) on those pairs, with ``train_dpo``: DPO, and DPO +
   ``nll_weight`` x NLL on the chosen answers (RPO, the fix for likelihood displacement where labels
   are right vs wrong answers).
5. On ``test_prompts`` other images: greedy accuracy before/after (overall and per kind), sampled
   accuracy, the win rate of each arm's samples against SFT's (the ground truth judges; ties count
   1/2) and KL(pi || pi_SFT) from the arm's samples, in nats per answer.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from preftune.lab.options import command_line, opt


@dataclass
class VisionLabOptions:
    """Every knob of ``preftune lab vision``."""

    output_dir: str = opt("runs/vision-lab",
                          "where the model, data, the runs, results.json and report.md go")
    sft_examples: int = opt(3000, "SFT examples (image, question, correct answer)")
    sft_epochs: float = opt(8.0, "SFT epochs")
    sft_learning_rate: float = opt(2e-3, "SFT learning rate (the vision tower starts from random weights)")
    patch_size: int = opt(8, "vision-tower patch size on the 32x32 images (8: 16 image tokens, 4: 64)")
    dpo_prompts: int = opt(8000, "held-out images (one question each) sampled twice and labelled for DPO")
    test_prompts: int = opt(900, "other images the accuracy, win rate and KL are measured on")
    beta: float = opt(0.1, "DPO beta")
    nll_weight: float = opt(1.0,
                            "weight of the NLL term on chosen answers in the second arm (DPO + NLL, RPO)")
    dpo_learning_rate: float = opt(2e-4, "DPO learning rate")
    dpo_epochs: float = opt(2.0, "DPO epochs over the labelled pairs")
    online_rounds: int = opt(2, "rounds of the online arm: each samples the current policy on its share of "
                                "the held-out images, labels its answers, trains DPO + NLL from it")
    batch_size: int = opt(32, "SFT and DPO batch size")
    temperature: float = opt(1.0, "sampling temperature")
    eval_samples: int = opt(4, "samples per test prompt and policy (sampled accuracy, win rate, KL)")
    seed: int = opt(0, "seeds everything")
    seeds: int = opt(3, "runs, with seeds seed, seed+1, ...: the report gives each figure as mean ± sd over "
                        "them, and an arm's difference from SFT only where it exceeds their spread")
    threads: int = opt(1, "CPU threads for torch (1 is fastest for this tiny model on a shared machine)")

    def __post_init__(self) -> None:
        counts = {k: getattr(self, k) for k in ("sft_examples", "dpo_prompts", "test_prompts", "batch_size",
                                                 "eval_samples", "threads", "seeds", "online_rounds")}
        for key, value in counts.items():
            if value < 1:
                raise ValueError(f"lab vision: --{key} must be >= 1, got {value}")
        if self.patch_size < 1 or 32 % self.patch_size:
            raise ValueError(f"lab vision: --patch_size must divide the 32-pixel images, "
                             f"got {self.patch_size}")
        for key in ("sft_epochs", "dpo_epochs", "sft_learning_rate", "dpo_learning_rate", "beta",
                    "temperature", "nll_weight"):
            if not getattr(self, key) > 0:
                raise ValueError(f"lab vision: --{key} must be > 0, got {getattr(self, key)}")


@dataclass
class PolicyScore:
    """One policy on the test images; win rate and KL are against the SFT model (0.5 and 0 for it)."""

    accuracy: float  # greedy answers correct
    by_kind: dict[str, float]
    sampled_accuracy: float
    win_rate: float = 0.5  # its samples vs SFT's on the same prompts, ground truth judging, ties 1/2
    kl: float = 0.0  # KL(pi || pi_SFT), nats per answer, from its own samples
    kl_sem: float = 0.0
    chosen_log_ratio: float = 0.0  # mean log pi(chosen)/pi_SFT(chosen) over training (< 0: displacement)


@dataclass
class VisionLabResult:
    policies: dict[str, PolicyScore]  # "sft", "dpo", "dpo+nll"
    pairs: int
    both_right: int
    both_wrong: int
    seconds: float


class _Prompts:
    """Examples as the model sees them: the rows written for them, expanded prompt ids, image references."""

    def __init__(self, examples, directory: Path, name: str, tokenizer, images):
        from preftune.data.images import parse_images
        from preftune.data.tokenize import Budgets, PairTokenizer
        from preftune.lab.shapes import write_dataset

        self.examples = examples
        self.path = write_dataset(examples, directory, name=name, kind="prompts")
        self.rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                 for r in self.rows]
        self.images = [parse_images(r["images"], self.path.parent) for r in self.rows]
        self.ids = PairTokenizer(tokenizer, Budgets(None, None, None), images).encode_prompts(texts,
                                                                                              self.images)


class _Policy:
    """A trained model directory, loaded for sampling and scoring."""

    def __init__(self, directory: Path):
        from preftune.model.load import load_model, load_tokenizer
        from preftune.model.logps import SequenceScorer
        from preftune.model.vision import load_image_inputs

        self.tokenizer = load_tokenizer(str(directory))
        self.images = load_image_inputs(str(directory), self.tokenizer)
        self.model = load_model(str(directory)).eval()
        self.scorer = SequenceScorer(self.model)

    def sample(self, prompts: _Prompts, k: int, temperature: float, seed: int, greedy: bool = False):
        from preftune.lab.image_answers import sample_answers

        return sample_answers(self.model, self.tokenizer, self.images, prompts.ids, prompts.images,
                              num_samples=k, temperature=temperature, seed=seed, greedy=greedy)

    def text(self, ids: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def logps(self, prompts: _Prompts, answers: list[list[tuple[int, ...]]]) -> np.ndarray:
        """log pi of every answer (``[P][k]``, flattened prompt-major)."""
        from preftune.lab.image_answers import answer_logps

        flat = [(p, refs, y) for p, refs, ys in zip(prompts.ids, prompts.images, answers) for y in ys]
        ids, refs, ys = zip(*flat)
        return answer_logps(self.scorer, self.images, ids, refs, ys).numpy()


def _label_pairs(sft: _Policy, prompts: _Prompts, options: VisionLabOptions,
                 seed: int | None = None) -> tuple[list[dict], int, int]:
    """Two answers of ``sft`` (a policy) per image, labelled by the ground truth: (pairs rows, both right,
    both wrong)."""
    from preftune.lab.shapes import grade

    pairs, both_right, both_wrong = [], 0, 0
    answers = sft.sample(prompts, 2, options.temperature, options.seed if seed is None else seed)
    for ex, row, (a, b) in zip(prompts.examples, prompts.rows, answers):
        texts = [sft.text(a), sft.text(b)]
        right = [grade(ex, t) for t in texts]
        if right[0] == right[1]:
            both_right += right[0]
            both_wrong += not right[0]
            continue
        chosen, rejected = (texts[0], texts[1]) if right[0] else (texts[1], texts[0])
        pairs.append({"prompt": row["prompt"], "images": row["images"],
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs, both_right, both_wrong


def _online_arm(out: Path, examples: list, data: Path, options: VisionLabOptions, common: dict, log) -> None:
    """The online arm: round r samples the round's policy (SFT first) twice on its share of the held-out
    images (every ``online_rounds``-th, so the labelling budget equals the offline arms'), labels the
    answers by the ground truth and trains DPO + NLL from that policy (its own reference) on them."""
    from preftune.methods.dpo import train_dpo

    policy_dir = out / "sft" / "final"
    rounds = options.online_rounds
    for r in range(1, rounds + 1):
        policy = _Policy(policy_dir)
        prompts = _Prompts(examples[r - 1 :: rounds], data, f"online_prompts_{r}", policy.tokenizer,
                           policy.images)
        pairs, both_right, both_wrong = _label_pairs(policy, prompts, options, seed=options.seed + 10 + r)
        log(f"      online round {r}/{rounds}: {len(pairs)} pairs of its own answers (both right "
            f"{both_right}, both wrong {both_wrong})")
        if not pairs:
            raise ValueError(f"lab vision: online round {r}: no image got one right and one wrong answer")
        path = data / f"online_pairs_{r}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        run_dir = out / "online" / f"round_{r}"
        train_dpo({**common, "model": str(policy_dir), "train_file": str(path), "output_dir": str(run_dir),
                   "epochs": options.dpo_epochs, "loss": {"sigmoid": 1.0, "sft": options.nll_weight},
                   "learning_rate": options.dpo_learning_rate, "loss_params": {"beta": options.beta}})
        policy_dir = run_dir / "final"


def _evaluate(policy: _Policy, sft: _Policy, test: _Prompts, options: VisionLabOptions, seed: int,
              sft_right: list[list[bool]] | None = None) -> tuple[PolicyScore, list[list[bool]]]:
    """Greedy and sampled accuracy on ``test``; with ``sft_right`` (SFT's sampled grades) also the
    win rate and KL(policy || SFT) from the policy's own samples."""
    from preftune.lab.shapes import grade

    greedy = policy.sample(test, 1, 1.0, seed, greedy=True)
    samples = policy.sample(test, options.eval_samples, options.temperature, seed)
    right = [grade(ex, policy.text(g[0])) for ex, g in zip(test.examples, greedy)]
    sampled = [[grade(ex, policy.text(y)) for y in ys] for ex, ys in zip(test.examples, samples)]
    kinds = sorted({ex.kind for ex in test.examples})
    by_kind = {k: float(np.mean([r for r, ex in zip(right, test.examples) if ex.kind == k])) for k in kinds}
    score = PolicyScore(float(np.mean(right)), by_kind, float(np.mean(sampled)))
    if sft_right is not None:
        score.win_rate = float(np.mean([0.5 + 0.5 * (d - s) for ds, ss in zip(sampled, sft_right)
                                        for d, s in zip(ds, ss)]))
        ratio = policy.logps(test, samples) - sft.logps(test, samples)
        score.kl, score.kl_sem = float(ratio.mean()), float(ratio.std(ddof=1) / np.sqrt(len(ratio)))
    return score, sampled


def _evaluate_arms(sft: _Policy, runs: dict[str, Path], data: Path,
                   options: VisionLabOptions) -> dict[str, PolicyScore]:
    """SFT and each arm (its run directory in ``runs``) on the test images."""
    from preftune.lab.shapes import make_examples

    test = _Prompts(make_examples(options.test_prompts, options.seed + 2), data, "test_prompts",
                    sft.tokenizer, sft.images)
    sft_score, sft_right = _evaluate(sft, sft, test, options, options.seed + 3)
    policies = {"sft": sft_score}
    for i, (name, run_dir) in enumerate(runs.items()):
        policies[name], _ = _evaluate(_Policy(run_dir / "final"), sft, test, options, options.seed + 4 + i,
                                      sft_right)
        policies[name].chosen_log_ratio = _chosen_log_ratio(run_dir, options.beta)
    return policies


def _chosen_log_ratio(run_dir: Path, beta: float) -> float:
    """Mean over the logged training windows of log pi(chosen) / pi_SFT(chosen)
    (``rewards/chosen`` / beta)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["rewards/chosen"] / beta for r in rows if "rewards/chosen" in r]
    return float(np.mean(values)) if values else 0.0


def run_vision_lab(options: VisionLabOptions, log=print) -> VisionLabResult:
    from preftune.lab.shapes import make_examples, write_dataset
    from preftune.lab.vision_model import build_tiny_vlm
    from preftune.methods.dpo import train_dpo
    from preftune.methods.sft import train_sft
    from preftune.model.load import torch_threads
    from preftune.quiet import no_hub_bars

    start = time.time()
    no_hub_bars()
    out = Path(options.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a lab run starts over (its runs are its own, not resumable)
    with torch_threads(options.threads):
        model_dir = build_tiny_vlm(out / "model", seed=options.seed, patch_size=options.patch_size)
        data = out / "data"
        write_dataset(make_examples(options.sft_examples, options.seed), data, name="sft", kind="sft")
        common = {"batch_size": options.batch_size, "seed": options.seed, "logging_steps": 10,
                  "gradient_checkpointing": False, "save_steps": 0}
        log(f"[1/4] SFT of the tiny image-text model on {options.sft_examples} answered images")
        train_sft({**common, "model": str(model_dir), "train_file": str(data / "sft.jsonl"),
                   "output_dir": str(out / "sft"), "epochs": options.sft_epochs,
                   "learning_rate": options.sft_learning_rate, "warmup_ratio": 0.05})
        sft = _Policy(out / "sft" / "final")

        log(f"[2/4] two answers of the SFT model per held-out image ({options.dpo_prompts}), labelled by the "
            "truth")
        prompts = _Prompts(make_examples(options.dpo_prompts, options.seed + 1), data, "dpo_prompts",
                           sft.tokenizer, sft.images)
        pairs, both_right, both_wrong = _label_pairs(sft, prompts, options)
        if not pairs:
            raise ValueError("lab vision: no image got one right and one wrong answer (the SFT model is "
                             "always right or always wrong): change --sft_epochs or --dpo_prompts")
        (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

        arms = {"dpo": "sigmoid", "dpo+nll": {"sigmoid": 1.0, "sft": options.nll_weight}}
        log(f"[3/4] DPO, and DPO + {options.nll_weight:g} x NLL, from the SFT model on {len(pairs)} pairs "
            f"(both right: {both_right}, both wrong: {both_wrong})")
        for name, loss in arms.items():
            train_dpo({**common, "model": str(out / "sft" / "final"), "train_file": str(data / "pairs.jsonl"),
                       "output_dir": str(out / name), "epochs": options.dpo_epochs, "loss": loss,
                       "learning_rate": options.dpo_learning_rate, "loss_params": {"beta": options.beta}})

        log(f"      and online: {options.online_rounds} rounds of DPO + NLL on pairs of the policy's "
            "own answers")
        _online_arm(out, prompts.examples, data, options, common, log)

        log(f"[4/4] evaluation on {options.test_prompts} other images")
        runs = {name: out / name for name in arms}
        runs["online"] = out / "online" / f"round_{options.online_rounds}"  # its last round
        policies = _evaluate_arms(sft, runs, data, options)
    result = VisionLabResult(policies, len(pairs), both_right, both_wrong, time.time() - start)
    (out / "results.json").write_text(json.dumps({"options": asdict(options), **asdict(result)}, indent=2)
                                      + "\n")
    (out / "report.md").write_text(format_report(result, options))
    return result


def format_report(result: VisionLabResult, options: VisionLabOptions) -> str:
    p = result.policies
    s, d, n, o = p["sft"], p["dpo"], p["dpo+nll"], p["online"]
    names = list(p)
    rows = [("greedy accuracy", lambda x: f"{x.accuracy:.3f}"),
            *[(f"greedy accuracy, {k}", lambda x, k=k: f"{x.by_kind[k]:.3f}") for k in s.by_kind],
            (f"sampled accuracy (T={options.temperature:g})", lambda x: f"{x.sampled_accuracy:.3f}"),
            ("win rate vs SFT (samples, ties 1/2)", lambda x: f"{x.win_rate:.3f}"),
            ("KL(pi || pi_SFT), nats per answer", lambda x: f"{x.kl:.3f} ± {x.kl_sem:.3f}"),
            ("log pi/pi_SFT of the chosen answers in training (mean)",
             lambda x: f"{x.chosen_log_ratio:+.3f}")]
    return "\n".join([
        "# preftune lab vision: DPO on a tiny image-text model",
        "",
        f"On {options.test_prompts} unseen images, greedy answer accuracy went from **{s.accuracy:.3f}** "
        f"(SFT) to **{d.accuracy:.3f}** with DPO, **{n.accuracy:.3f}** with DPO + NLL and "
        f"**{o.accuracy:.3f}** with {options.online_rounds} online rounds of DPO + NLL; the offline arms' "
        "sampled "
        f"answers beat SFT's in {d.win_rate:.3f} and {n.win_rate:.3f} of comparisons, at KL {d.kl:.2f} and "
        f"{n.kl:.2f} nats per answer. The {result.pairs} pairs were labelled by the ground truth: of "
        f"{options.dpo_prompts} images, those whose two SFT answers were one right and one wrong (both right "
        f"{result.both_right}, both wrong {result.both_wrong}).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *[f"| {label} | " + " | ".join(fmt(p[k]) for k in names) + " |" for label, fmt in rows],
        "",
        "Where DPO's chosen answers lose likelihood against SFT while the margin grows (likelihood "
        "displacement), the probability freed from both answers goes to other answers. The NLL term on the "
        "chosen answers (RPO) keeps their likelihood up.",
        "",
        f"Time: {result.seconds:.0f} s. Command: `{command_line('preftune lab vision', options)}`",
        "",
    ])
