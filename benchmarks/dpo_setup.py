"""``bench_dpo.py``'s preparation: the model of a shape, the workloads' data files and per-step token
statistics, the preftune options a run sets, the fp32 matmul peak and the model's parameter counts."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from bench_common import HH_FILE, SHAPES, hh_rows, param_counts

#: --pt-gradient-checkpointing (and a matrix run's @mode) -> preftune's gradient_checkpointing value
CKPT_OPTION: dict[str | None, Any] = {None: None, "on": True, "full": True, "off": False,
                                      "selective": "selective"}
_PREFTUNE_KEYS = ("layout", "pack_length", "logit_chunk_size", "gradient_checkpointing", "cpu_allocator")


# ---- model ----------------------------------------------------------------------------------------------
def build_model(model_dir: Path, tokenizer_dir: Path, seed: int, shape: str = "stock",
                hh_file: Path | None = None) -> None:
    """The shape's Llama from its config with a fixed seed, and its tokenizer, saved once in ``model_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = SHAPES[shape]["config"]
    marker = model_dir / "bench-model.json"
    bpe = SHAPES[shape]["tokenizer"] == "bpe"
    spec = {"config": cfg, "seed": seed, "tokenizer": "bpe" if bpe else str(tokenizer_dir)}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return
    shutil.rmtree(model_dir, ignore_errors=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer = train_bpe(cfg["vocab_size"], hh_file) if bpe else AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token_id is None
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == cfg["eos_token_id"]
    tokenizer.save_pretrained(model_dir)
    marker.write_text(json.dumps(spec))


def train_bpe(vocab_size: int, hh_file: Path | None) -> Any:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer, no BOS added, ``<|endoftext|>`` = id 0 = BOS = EOS,
    no pad token: as GPT-2's) of at most ``vocab_size`` ids, trained on the HH-RLHF harmless-base test
    texts: the small-vocabulary shapes need ids below their vocabulary. Deterministic for a given file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with gzip.open(hh_file or HH_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def model_sizes(model_dir: str) -> dict[str, int]:
    """``non_embedding`` (decoder matmuls + norms), ``head`` (H x V), ``hidden``, ``vocab`` of a model dir."""
    counts = param_counts(json.loads((Path(model_dir) / "config.json").read_text()))
    return {"non_embedding": counts["decoder"] + counts["norms"], "head": counts["head"],
            "hidden": counts["hidden"], "vocab": counts["vocab"]}


# ---- data -----------------------------------------------------------------------------------------------
def _fit(tokenizer: Any, max_length: int, texts: list[tuple[str, str, str]]):
    """preftune's own tokenization with ``max_prompt_length: null`` (TRL-equivalent truncation)."""
    from preftune.data.formats import PreferencePair
    from preftune.data.tokenize import Budgets, PairTokenizer

    pairs = [PreferencePair(p, c, r) for p, c, r in texts]
    out = PairTokenizer(tokenizer, Budgets(max_length, None, None)).tokenize(pairs)
    assert out.dropped_identical == 0
    return out.pairs


def _hh_texts(tokenizer: Any, max_length: int, n: int, seed: int,
              hh_file: Path) -> list[tuple[str, str, str]]:
    texts = [pair for _, pair in hh_rows(hh_file) if pair is not None]
    random.Random(seed).shuffle(texts)
    keep = []
    eos = tokenizer.eos_token_id
    for text in texts:
        p, c, r = text
        p_ids = tokenizer(p)["input_ids"]
        if len(p_ids) >= max_length:  # TRL drops these (prompt fills max_length)
            continue
        # keep rows whose prompt ids are a prefix of both joint tokenizations: there preftune and TRL
        # split prompt/completion ids identically (they differ when tokens merge across the boundary)
        if any(tokenizer(p + x)["input_ids"][: len(p_ids)] != p_ids for x in (c, r)):
            continue
        (pair,) = _fit(tokenizer, max_length, [text])
        if pair.chosen_ids == pair.rejected_ids or eos in pair.prompt_ids:
            continue
        keep.append(text)
        if len(keep) == n:
            return keep
    raise SystemExit(f"{hh_file}: only {len(keep)} usable pairs, {n} needed; use fewer steps")


def _synthetic_texts(tokenizer: Any, n: int, seed: int, prompt_len: int = 64,
                     completion_range: tuple[int, int] = (64, 192)) -> list[tuple[str, str, str]]:
    """Sequences of GPT-2 tokens ' word' (space + lowercase letters): each is its own pre-token and its
    own BPE token, so the text re-tokenizes to exactly the drawn ids. Completion lengths include EOS."""
    vocab = tokenizer.get_vocab()
    words = sorted(tok for tok in vocab if tok.startswith("\u0120") and tok[1:].isascii()
                   and tok[1:].isalpha() and tok[1:].islower() and len(tok) > 2)
    # keep words that re-tokenize alone to their own id (always so for GPT-2; checked for trained BPEs)
    words = [w for w in words
             if tokenizer(tokenizer.convert_tokens_to_string([w]))["input_ids"] == [vocab[w]]]
    assert len(words) >= 50, f"only {len(words)} single-token words in the vocabulary"
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(tokenizer.convert_tokens_to_string([rng.choice(words)]) for _ in range(k))

    out = []
    for _ in range(n):
        prompt = text(prompt_len)
        c = text(rng.randint(*completion_range) - 1)
        r = text(rng.randint(*completion_range) - 1)
        out.append((prompt, c, r))
    return out


def workload_spec(workload: str, max_length: int) -> dict[str, Any]:
    """Token budget of a workload: ``max_length`` and, for synthetic ones, prompt length and completion
    length range (EOS included)."""
    if workload == "hh":
        return {"max_length": max_length}
    if workload == "synthetic":
        return {"max_length": max_length, "prompt": 64, "completion": (64, 192)}
    if workload == "long":
        return {"max_length": max(max_length, 1024), "prompt": 150, "completion": (300, 600)}
    fixed = re.fullmatch(r"fixed(\d+)(?:p(\d+))?", workload)
    if fixed:  # fixed<L>[p<prompt percent>]: every sequence L tokens, the prompt L/4 or <percent>% of L
        n = int(fixed.group(1))
        prompt = n * int(fixed.group(2)) // 100 if fixed.group(2) else n // 4
        return {"max_length": n, "prompt": prompt, "completion": (n - prompt, n - prompt)}
    raise SystemExit(f"unknown workload {workload!r}")


def shape_work_dir(args: argparse.Namespace) -> Path:
    """The issue-5 model keeps ``--work-dir``; other shapes get a subdirectory each."""
    work = Path(args.work_dir)
    return work if getattr(args, "shape", "stock") == "stock" else work / args.shape


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Model dir, data files and per-step token statistics; returns the plan the workers read."""
    from transformers import AutoTokenizer

    work = shape_work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    build_model(model_dir, Path(args.tokenizer), args.seed, getattr(args, "shape", "stock"),
                Path(args.hh_file))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total_steps = args.warmup + args.steps
    n = total_steps * args.batch_size
    plan: dict[str, Any] = {"model_dir": str(model_dir), "workloads": {}, "n_pairs": n,
                            "total_steps": total_steps, "work_dir": str(work)}
    for workload in args.workloads:
        plan["workloads"][workload] = _workload_plan(args, tokenizer, workload, work, n, total_steps)
    return plan


def _workload_plan(args: argparse.Namespace, tokenizer: Any, workload: str, work: Path, n: int,
                   total_steps: int) -> dict[str, Any]:
    """Writes ``<workload>.jsonl`` (texts) and ``<workload>.ids.json`` (preftune's token ids) in ``work``;
    returns their paths, the data order, ``max_length`` and the token statistics."""
    from preftune.engine.steps import step_indices

    ws = workload_spec(workload, args.max_length)
    max_length = ws["max_length"]
    if workload == "hh":
        texts = _hh_texts(tokenizer, max_length, n, args.seed, Path(args.hh_file))
    else:
        texts = _synthetic_texts(tokenizer, n, args.seed, ws["prompt"], ws["completion"])
    pairs = _fit(tokenizer, max_length, texts)
    if workload != "hh":  # exact token counts: prompt, completions in range incl. EOS
        lo, hi = ws["completion"]
        assert all(len(p.prompt_ids) == ws["prompt"] and lo <= len(p.chosen_ids) <= hi
                   and lo <= len(p.rejected_ids) <= hi for p in pairs), "synthetic text did not round-trip"
    path = work / f"{workload}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for p, c, r in texts:
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
    order = [i for s in range(total_steps) for i in step_indices(n, args.batch_size, args.seed, s)]
    ids_path = work / f"{workload}.ids.json"
    ids_path.write_text(json.dumps([[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)]
                                    for p in pairs]))
    return {"train_file": str(path), "ids_file": str(ids_path), "order": order, "max_length": max_length,
            "stats": token_stats(pairs, order, args, total_steps)}


def token_stats(pairs, order: list[int], args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    """Per step: pair tokens (= TRL's non-pad tokens), TRL's padded positions, preftune's processed
    tokens and positions in its layout, scored tokens. Lists of length ``total_steps``."""
    from preftune.data.batching import collate

    b = args.batch_size
    keys = ("pair_tokens", "trl_positions", "pt_tokens", "pt_positions", "scored")
    out: dict[str, Any] = {k: [] for k in keys}
    opts = effective_preftune_options(args)
    for s in range(total_steps):
        batch = [pairs[i] for i in order[s * b : (s + 1) * b]]
        fb = collate(batch, layout=opts["layout"], pack_length=opts["pack_length"], pad_id=0)
        out["pair_tokens"].append(sum(p.num_tokens for p in batch))
        longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in batch)
        out["trl_positions"].append(2 * len(batch) * longest)
        out["pt_tokens"].append(fb.num_real_tokens)
        out["pt_positions"].append(int(fb.input_ids.numel()))
        out["scored"].append(sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch))
    lengths = {k: [len(getattr(p, f"{k}_ids")) for p in pairs] for k in ("prompt", "chosen", "rejected")}
    out["lengths"] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in lengths.items()}
    return out


# ---- preftune's options and config ----------------------------------------------------------------------
def preftune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The preftune options given on the command line; the rest stay at preftune's defaults."""
    options = {"layout": args.layout, "logit_chunk_size": args.logit_chunk_size,
               "pack_length": None if args.pack_length == 0 else args.pack_length,
               "gradient_checkpointing": CKPT_OPTION.get(args.pt_gradient_checkpointing),
               "cpu_allocator": args.pt_cpu_allocator}
    given = {"layout": args.layout, "logit_chunk_size": args.logit_chunk_size,
             "pack_length": args.pack_length, "gradient_checkpointing": args.pt_gradient_checkpointing,
             "cpu_allocator": args.pt_cpu_allocator}
    return {k: v for k, v in options.items() if given[k] is not None}


def effective_preftune_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`preftune_options` completed with preftune's defaults."""
    from preftune.methods.dpo import DPOConfig

    defaults = DPOConfig.__dataclass_fields__
    given = preftune_options(args)
    return {k: given.get(k, defaults[k].default) for k in _PREFTUNE_KEYS}


def preftune_config(*, model_dir: str, train_file: str, batch_size: int, total_steps: int, max_length: int,
                    seed: int, reference: str, tmp: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``train_dpo``'s config of a benchmark run: fp32 DPO, beta 0.1, AdamW lr 1e-6 with linear decay,
    grad clip 1.0, dropout off, a log line every step, nothing saved, ``max_prompt_length: null`` (TRL's
    truncation); ``reference`` ``default`` / ``auto`` leaves preftune's choice, a reference cache (when
    there is one) fresh in ``tmp``; ``options`` (layout, checkpointing, ...) override the rest."""
    config = dict(
        model=model_dir, train_file=train_file, batch_size=batch_size, max_steps=total_steps,
        learning_rate=1e-6, max_length=max_length, max_prompt_length=None, loss_params={"beta": 0.1},
        logging_steps=1, progress_bar=False, save_final=False, output_dir=str(tmp / "out"), seed=seed,
        disable_dropout=True, optimizer="adamw", lr_scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0,
    )
    config.update(options)
    if reference not in ("default", "auto"):
        config["reference"] = reference
    if reference in ("default", "auto", "precomputed"):
        config["reference_cache_dir"] = str(tmp / "refcache")  # fresh: any precompute pass is part of the run
    return config


# ---- the machine's fp32 matmul peak ----------------------------------------------------------------------
def now() -> tuple[float, float]:
    """Wall clock and this process's CPU time (user + system, all threads)."""
    cpu = os.times()
    return time.perf_counter(), cpu.user + cpu.system


def matmul_peak(seconds: float = 6.0) -> tuple[float, float]:
    """fp32 FLOP/s of torch.mm on square matrices (best of a few sizes), all threads (or the GPU; TF32 off):
    per wall second, and per CPU second of the process divided by the thread count (robust to other load)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    best, best_cpu = 0.0, 0.0
    for n in (1024, 2048, 3072) if device == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        torch.mm(a, b)
        sync()
        reps, (start, cpu) = 0, now()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            reps += 1
        sync()
        end, cpu_end = now()
        best = max(best, 2 * n**3 * reps / (end - start))
        best_cpu = max(best_cpu, 2 * n**3 * reps / ((cpu_end - cpu) / threads))
    return best, (best_cpu if device == "cpu" else best)
