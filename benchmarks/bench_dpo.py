"""DPO speed / memory benchmark: preftune vs TRL's DPOTrainer (issue 5). Run by hand, never in CI.

    pip install -e '.[bench]'          # trl + psutil, benchmark-only
    python benchmarks/bench_dpo.py                      # full run, writes benchmarks/RESULTS.md
    python benchmarks/bench_dpo.py --quick              # smoke check: 1 warm-up + 3 timed steps, 1 repeat
    python benchmarks/bench_dpo.py profile --workload hh  # torch.profiler of preftune's step

    # issue 15: model shapes x workloads (results appended to <work-dir>/matrix.jsonl), then SHAPES.md
    python benchmarks/bench_dpo.py --threads 1 --work-dir /tmp/preftune-shapes matrix --shapes head50,head20,head5 \
        --workloads synthetic,hh,long --runs preftune:default,trl:default,preftune:default@selective \
        --warmup 1 --steps 4 --repeats 1
    python benchmarks/bench_dpo.py --threads 1 --work-dir /tmp/preftune-shapes profile --shape head20 \
        --workload synthetic --reference default --pt-gradient-checkpointing selective \
        --profile-out /tmp/preftune-shapes/profiles.jsonl
    python benchmarks/bench_dpo.py --work-dir /tmp/preftune-shapes shapes-render   # writes benchmarks/SHAPES.md

Shapes (``SHAPES``): ``stock`` is the issue-5 model below; ``head50`` / ``head20`` / ``head5`` share one decoder
(4 x 512, ffn 1408: 12.85M matmul parameters) and differ in vocabulary (25088 / 6272 / 1280), which puts the
LM head at 50.0% / 20.0% / 4.9% of the matmul parameters; ``floor`` (12 x 768, ffn 2048, vocab 32000, 134M
parameters) is for peak memory against weights + gradients + AdamW state. The non-stock shapes use a byte-level
BPE tokenizer with their vocabulary, trained on the HH-RLHF harmless-base test texts. Workloads: ``hh``,
``synthetic`` (short: prompt 64, completions 64-192), ``long`` (prompt 150, completions 300-600, max_length
>= 1024) and ``fixed<L>`` (prompt L/4, chosen and rejected 3L/4: every sequence L tokens, for scaling;
``fixed<L>p<P>``: the prompt P% of L).
preftune's checkpointing: ``--pt-gradient-checkpointing on|full|off|selective`` or ``@full|@off|@selective``
after a matrix run name; ``selective`` is applied in the worker with ``preftune.model.checkpointing``.

What it does
------------
* A Llama-architecture model (8 layers, hidden 512, 8 heads, intermediate 1376, vocab 50257, untied
  embeddings) is built from its config with a fixed seed and saved once, with the real GPT-2 tokenizer
  (BOS = EOS = <|endoftext|>, no pad token); both trainers load those weights.
* Two workloads of exactly ``(warmup + steps) * batch`` pairs (so a reference precompute pass covers
  precisely the trained pairs): ``hh`` (HH-RLHF harmless-base test, implicit prompt split by preftune's
  ``split_implicit_prompt``, handed to both trainers as explicit ``prompt/chosen/rejected`` strings) and
  ``synthetic`` (prompts of 64 tokens, completions of U[64, 192] tokens, EOS included, built from GPT-2
  tokens that round-trip exactly).
* Truncation is made identical: TRL 1.x has no ``max_prompt_length``; it keeps the first ``max_length``
  tokens of prompt + completion and drops rows whose prompt alone fills ``max_length``. preftune with
  ``max_prompt_length: null`` keeps the prompt and cuts each completion to ``max_length - len(prompt)``,
  which is the same for every prompt shorter than ``max_length``; so the data keeps only such rows (and,
  like preftune, no pair whose chosen and rejected ids are equal after truncation). The TRL worker checks
  that the token ids TRL trains on equal preftune's, row by row.
* Same data order: preftune draws step ``s`` as ``step_indices(n, batch, seed, s)``; TRL gets the rows
  in that order through a sequential sampler (``_get_train_sampler`` overridden; no shuffling).
* Each (trainer, configuration) runs in its own subprocess (peak RSS is per process), alternated
  A/B/A/B within one invocation; the fp32 matmul peak of the machine is measured in the same invocation.

FLOP model (``model FLOPs``, no recomputation, attention score FLOPs omitted)::

    policy step     6 * N * T  +  6 * H * V * S
    reference fwd   2 * N * T  +  2 * H * V * S     (per step, or once per pair in a precompute pass)

``N`` = non-embedding parameters (attention + MLP + norms, no embedding, no LM head), ``T`` = non-pad
tokens the trainer's layout actually runs (TRL: prompt + completion for chosen and for rejected;
preftune prefix_shared: prompt once + chosen + rejected), ``S`` = scored completion tokens,
``H * V`` = LM head size. MFU = model FLOPs / second / measured fp32 matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import cpu_model, hh_rows, memory_gib, versions

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("PREFTUNE_SHARED_DATA", "/work/shared/data"))
MODEL_CONFIG = dict(
    vocab_size=50257, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=50256,
    eos_token_id=50256, attention_dropout=0.0,
)
# model shapes for the shape matrix (issue 15): one decoder (4 x 512, ffn 1408, 8 heads: 12.85M matmul
# parameters) and three vocabularies that set the LM head's share of the matmul parameters; "floor" is the
# >= 100M-parameter model of the memory-floor check. "stock" is the issue-5 model above (GPT-2 tokenizer).
_SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0,
              eos_token_id=0, attention_dropout=0.0)
SHAPES: dict[str, dict[str, Any]] = {
    "stock": {"config": MODEL_CONFIG, "tokenizer": "gpt2"},
    "head50": {"config": {**_SMALL, "vocab_size": 25088}, "tokenizer": "bpe"},  # head 50.0% of matmul params
    "head20": {"config": {**_SMALL, "vocab_size": 6272}, "tokenizer": "bpe"},  # 20.0%
    "head5": {"config": {**_SMALL, "vocab_size": 1280}, "tokenizer": "bpe"},  # 4.9%
    "floor": {"config": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                             num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=0, attention_dropout=0.0, vocab_size=32000),
              "tokenizer": "bpe"},  # 134M parameters, head 22% of matmul params
}
# workloads: hh (real pairs), synthetic (= "short": prompt 64, completions 64-192), long (prompt 150,
# completions 300-600, max_length >= 1024), fixed<L> (prompt L/4, chosen and rejected 3L/4: every sequence L)
WORKLOADS = ("hh", "synthetic", "long")
# (trainer, mode): the runs of one repeat, in the order they alternate
RUNS = {
    "preftune:default": "preftune defaults (reference auto -> precomputed in the run when the run covers the data)",
    "trl:default": "TRL DPOConfig defaults (gradient checkpointing on, separate reference model), fp32",
    "preftune:model": "preftune, separate frozen reference model scored every step (other options default)",
    "trl:model": "TRL, separate reference model, gradient checkpointing off",
    "preftune:precomputed": "preftune, reference: precomputed (cache built in the run)",
    "trl:precomputed": "TRL, precompute_ref_log_probs=True, gradient checkpointing off",
}
KEEP_MARKER = "<!-- hand-written analysis below; bench_dpo.py keeps it when it rewrites this file -->"
COMPARISONS = (  # (label, preftune run, TRL run)
    ("(1) default vs default", "preftune:default", "trl:default"),
    ("(2a) separate reference model, both", "preftune:model", "trl:model"),
    ("(2b) precomputed reference, both", "preftune:precomputed", "trl:precomputed"),
)


# ---------------------------------------------------------------------------------------------
# preparation: model, data, token statistics
# ---------------------------------------------------------------------------------------------
def build_model(model_dir: Path, tokenizer_dir: Path, seed: int, shape: str = "stock",
                hh_file: Path | None = None) -> None:
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
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id == tokenizer.bos_token_id == cfg["eos_token_id"]
    tokenizer.save_pretrained(model_dir)
    marker.write_text(json.dumps(spec))


def train_bpe(vocab_size: int, hh_file: Path | None) -> Any:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer, no BOS added, ``<|endoftext|>`` = id 0 = BOS = EOS,
    no pad token: as GPT-2's) of at most ``vocab_size`` ids, trained on the HH-RLHF harmless-base test
    texts: the small-vocabulary shapes need ids below their vocabulary. Deterministic for a given file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with gzip.open(hh_file or SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def _fit(tokenizer: Any, max_length: int, texts: list[tuple[str, str, str]]):
    """preftune's own tokenization with ``max_prompt_length: null`` (TRL-equivalent truncation)."""
    from preftune.data.formats import PreferencePair
    from preftune.data.tokenize import Budgets, PairTokenizer

    pairs = [PreferencePair(p, c, r) for p, c, r in texts]
    out = PairTokenizer(tokenizer, Budgets(max_length, None, None)).tokenize(pairs)
    assert out.dropped_identical == 0
    return out.pairs


def _hh_texts(tokenizer: Any, max_length: int, n: int, seed: int, hh_file: Path) -> list[tuple[str, str, str]]:
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
    words = sorted(tok for tok in vocab if tok.startswith("\u0120") and tok[1:].isascii() and tok[1:].isalpha()
                   and tok[1:].islower() and len(tok) > 2)
    # keep words that re-tokenize alone to their own id (always so for GPT-2; checked for trained BPEs)
    words = [w for w in words if tokenizer(tokenizer.convert_tokens_to_string([w]))["input_ids"] == [vocab[w]]]
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

    from preftune.engine.loop import step_indices

    work = shape_work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    build_model(model_dir, Path(args.tokenizer), args.seed, getattr(args, "shape", "stock"), Path(args.hh_file))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total_steps = args.warmup + args.steps
    n = total_steps * args.batch_size
    plan: dict[str, Any] = {"model_dir": str(model_dir), "workloads": {}, "n_pairs": n, "total_steps": total_steps,
                            "work_dir": str(work)}
    for workload in args.workloads:
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
        ids_path.write_text(json.dumps([[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)] for p in pairs]))
        plan["workloads"][workload] = {"train_file": str(path), "ids_file": str(ids_path), "order": order,
                                       "max_length": max_length,
                                       "stats": token_stats(pairs, order, args, total_steps)}
    return plan


def token_stats(pairs, order: list[int], args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    """Per step: pair tokens (= TRL's non-pad tokens), TRL's padded positions, preftune's processed
    tokens and positions in its layout, scored tokens. Lists of length ``total_steps``."""
    from preftune.data.batching import collate

    b = args.batch_size
    out: dict[str, list[int]] = {k: [] for k in ("pair_tokens", "trl_positions", "pt_tokens", "pt_positions", "scored")}
    for s in range(total_steps):
        batch = [pairs[i] for i in order[s * b : (s + 1) * b]]
        opts = effective_preftune_options(args)
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
        reps, (start, cpu) = 0, _now()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            reps += 1
        sync()
        end, cpu_end = _now()
        best = max(best, 2 * n**3 * reps / (end - start))
        best_cpu = max(best_cpu, 2 * n**3 * reps / ((cpu_end - cpu) / threads))
    return best, (best_cpu if device == "cpu" else best)


def model_sizes(model_dir: str) -> dict[str, int]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate/up/down; two RMSNorms
    return {"non_embedding": layers * per_layer + h, "head": h * v, "hidden": h, "vocab": v}


# ---------------------------------------------------------------------------------------------
# workers: one trainer, one configuration, one process
# ---------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    trainer, mode = spec["run"].split(":")
    import torch

    if trainer == "preftune":
        import preftune.methods.dpo  # noqa: F401
    else:
        import trl  # noqa: F401
    import psutil

    torch.set_num_threads(spec["threads"])
    result: dict[str, Any] = {"run": spec["run"], "import_rss": psutil.Process().memory_info().rss}
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    try:
        result["loadavg_start"] = os.getloadavg()[0]
        cpu0, t0 = os.times(), time.perf_counter()
        steps = _run_preftune(spec, mode, tmp, result) if trainer == "preftune" else _run_trl(spec, mode, tmp, result)
        result["e2e_s"] = time.perf_counter() - t0
        cpu1 = os.times()
        result["user_s"], result["sys_s"] = cpu1.user - cpu0.user, cpu1.system - cpu0.system
        result["loadavg_end"] = os.getloadavg()[0]
        if torch.cuda.is_available():
            result["gpu_peak"] = torch.cuda.max_memory_allocated()
        result["step_end_s"] = [t - t0 for t, _, _ in steps]
        result["step_end_cpu_s"] = [c - (cpu0.user + cpu0.system) for _, c, _ in steps]
        result["metrics"] = [row for _, _, row in steps]
        result["peak_rss"] = _rss_bytes()
        result["threads"] = torch.get_num_threads()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(spec["out"]).write_text(json.dumps(result))


def _now() -> tuple[float, float]:
    """Wall clock and this process's CPU time (user + system, all threads)."""
    cpu = os.times()
    return time.perf_counter(), cpu.user + cpu.system


def _run_preftune(spec: dict, mode: str, tmp: Path, result: dict) -> list[tuple[float, float, dict]]:
    from preftune.methods.dpo import train_dpo

    steps: list[tuple[float, float, dict]] = []
    config = dict(
        model=spec["model_dir"], train_file=spec["train_file"], batch_size=spec["batch_size"],
        max_steps=spec["total_steps"], learning_rate=1e-6, max_length=spec["max_length"], max_prompt_length=None,
        loss_params={"beta": 0.1}, logging_steps=1, progress_bar=False, save_final=False,
        output_dir=str(tmp / "out"), seed=spec["seed"], disable_dropout=True, optimizer="adamw", lr_scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0,
    )
    config.update(spec["preftune_options"])
    if config.get("gradient_checkpointing") == "selective":
        config["gradient_checkpointing"] = False
        patch_load_policy("selective")
    if mode != "default":
        config["reference"] = mode
    if mode in ("default", "precomputed"):
        config["reference_cache_dir"] = str(tmp / "refcache")  # fresh: any precompute pass is part of the run
    run = train_dpo(config, callbacks=[lambda step, row: steps.append((*_now(), _pick(row)))])
    result["reference_mode"] = run.reference_mode
    assert len(run.data.train.pairs) == spec["n_pairs"], "preftune dropped or added pairs"
    return steps


def patch_load_policy(ckpt: str | None, label_recompute: bool = False) -> None:
    """Benchmark-side only: make ``train_dpo``'s ``load_policy`` apply ``enable_checkpointing(model, ckpt)``
    (when ``ckpt`` is given) and, with ``label_recompute``, put the checkpointed layers' forward under
    profiler labels: ``## recompute (checkpoint replay)`` when it runs inside backward, else
    ``## decoder layer forward``."""
    import torch
    from torch.profiler import record_function

    import preftune.methods.dpo as dpo
    from preftune.model.checkpointing import enable_checkpointing

    original = dpo.load_policy

    def wrap(ckpt_fn):
        def fn(function, *args, **kwargs):
            def labelled(*a, **k):
                in_backward = torch._C._current_graph_task_id() != -1
                with record_function("## recompute (checkpoint replay)" if in_backward else "## decoder layer forward"):
                    return function(*a, **k)
            return ckpt_fn(labelled, *args, **kwargs)
        return fn

    def load_policy(config):
        model = original(config)
        if ckpt is not None:
            enable_checkpointing(model, ckpt)
        if label_recompute:
            for m in model.modules():
                if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
                    m._gradient_checkpointing_func = wrap(m._gradient_checkpointing_func)
        return model

    dpo.load_policy = load_policy


def _pick(row: dict) -> dict:
    keys = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm", "logps/chosen",
            "logps/rejected")
    return {k: float(row[k]) for k in keys if k in row}


def _run_trl(spec: dict, mode: str, tmp: Path, result: dict) -> list[tuple[float, float, dict]]:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class SequentialDPOTrainer(DPOTrainer):
        """DPOTrainer reading the rows in the given order (preftune's permutation), for any transformers."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with open(spec["train_file"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list([rows[i] for i in spec["order"]])
    steps: list[tuple[float, float, dict]] = []
    logged: dict[int, dict] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append((*_now(), {}))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged[state.global_step] = _pick(logs)

    options: dict[str, Any] = {}
    if mode != "default":  # like for like with preftune: no gradient checkpointing
        options["gradient_checkpointing"] = False
    if mode == "precomputed":
        options["precompute_ref_log_probs"] = True
    args = DPOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=spec["batch_size"], max_steps=spec["total_steps"],
        learning_rate=1e-6, beta=0.1, max_length=spec["max_length"], bf16=False, fp16=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"], use_cpu=not spec["cuda"],
        dataloader_num_workers=0, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, **options,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = SequentialDPOTrainer(model=spec["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    trainer.train()
    steps = [(t, c, logged.get(i + 1, {})) for i, (t, c, _) in enumerate(steps)]
    # not timed: the ids TRL trained on must be preftune's (prompt + completion, first max_length)
    expected = json.loads(Path(spec["ids_file"]).read_text())
    got = trainer.train_dataset
    mismatches = 0
    for k, i in enumerate(spec["order"]):
        p, c, r = expected[i]
        row = got[k]
        m = spec["max_length"]
        mismatches += (row["prompt_ids"] + row["chosen_ids"])[:m] != p + c
        mismatches += (row["prompt_ids"] + row["rejected_ids"])[:m] != p + r
    result["token_mismatches"] = mismatches
    result["trl_rows"] = len(got)
    result["optimizer"] = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                               else trainer.optimizer).__name__
    result["trl_gradient_checkpointing"] = args.gradient_checkpointing
    return steps


# ---------------------------------------------------------------------------------------------
# orchestration and report
# ---------------------------------------------------------------------------------------------
def launch(spec: dict, work: Path, name: str) -> dict:
    spec_path = work / f"spec-{name}.json"
    spec["out"] = str(work / f"result-{name}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_DATASETS_CACHE=str(work / "hf-datasets"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker", "--spec", str(spec_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
    result = json.loads(Path(spec["out"]).read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def summarize(result: dict, stats: dict, sizes: dict, peaks: tuple[float, float], warmup: int, batch: int,
              n_pairs: int) -> dict:
    trainer, mode = result["run"].split(":")
    n_steps = len(result["step_end_s"])
    tokens = stats["pt_tokens"] if trainer == "preftune" else stats["pair_tokens"]
    N, HV = sizes["non_embedding"], sizes["head"]
    precomputed = result.get("reference_mode", mode) == "precomputed"

    def flops(step_range: range, with_precompute: bool) -> float:
        total = 0.0
        for s in step_range:
            t, sc = tokens[s], stats["scored"][s]
            total += 6 * N * t + 6 * HV * sc
            if not precomputed:
                total += 2 * N * t + 2 * HV * sc
        if with_precompute and precomputed:  # the dataset = exactly the trained pairs
            total += 2 * N * sum(tokens) + 2 * HV * sum(stats["scored"])
        return total

    peak, peak_cpu = peaks
    threads = result["threads"]
    ends, cpu_ends = result["step_end_s"], result["step_end_cpu_s"]
    steady_s = ends[-1] - ends[warmup - 1] if warmup else ends[-1]
    steady_cpu = cpu_ends[-1] - cpu_ends[warmup - 1] if warmup else cpu_ends[-1]
    steady = range(warmup, n_steps)
    e2e = result["e2e_s"]
    cpu_s = result["user_s"] + result["sys_s"]
    return {
        "run": result["run"],
        "e2e_s": e2e,
        "pairs_per_s": n_pairs / e2e,
        "tokens_per_s": sum(stats["pair_tokens"]) / e2e,
        "steady_pairs_per_s": batch * len(steady) / steady_s,
        "steady_step_s": steady_s / len(steady),
        "first_step_end_s": ends[0],
        "peak_rss": result["peak_rss"],
        "import_rss": result["import_rss"],
        "mfu_e2e": flops(range(n_steps), True) / e2e / peak,
        "mfu_steady": flops(steady, False) / steady_s / peak,
        # CPU-time view: as if the process had had its threads' cores to itself (robust to other load)
        "cpu_s": cpu_s,
        "threads": threads,
        "cpu_pairs_per_s": n_pairs / (cpu_s / threads),
        "steady_cpu_step_s": steady_cpu / len(steady),
        "steady_cpu_pairs_per_s": batch * len(steady) / (steady_cpu / threads),
        "mfu_steady_cpu": flops(steady, False) / (steady_cpu / threads) / peak_cpu,
        "metrics": result["metrics"],
        "token_mismatches": result.get("token_mismatches"),
        "user_s": result["user_s"], "sys_s": result["sys_s"], "gpu_peak": result.get("gpu_peak"),
        "loadavg": max(result["loadavg_start"], result["loadavg_end"]),
        "reference_mode": result.get("reference_mode", mode),
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def numerics(p: dict, t: dict, k: int) -> dict:
    out = {}
    for key in ("loss", "rewards/margins", "grad_norm", "rewards/chosen", "rewards/rejected"):
        pairs = [(a.get(key), b.get(key)) for a, b in zip(p["metrics"][:k], t["metrics"][:k])]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            out[key] = {"max_rel": max(rel(a, b) for a, b in pairs), "max_abs": max(abs(a - b) for a, b in pairs),
                        "preftune": [a for a, _ in pairs], "trl": [b for _, b in pairs]}
    # a reward is beta * (logp - logp_ref) of sums of ~|logps| magnitude: in fp32 the difference of two such
    # sums is only resolved to ~|logps| * 6e-8, so margins near 0 cannot agree in relative terms. Scale:
    scale = [0.1 * max(abs(a.get("logps/chosen", 0.0)), abs(a.get("logps/rejected", 0.0))) for a in p["metrics"][:k]]
    if "rewards/margins" in out and scale:
        out["rewards/margins"]["abs_over_beta_logps"] = out["rewards/margins"]["max_abs"] / max(max(scale), 1e-30)
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def run(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    started = time.perf_counter()
    print(f"[bench] preparing model and data in {work}", flush=True)
    plan = prepare(args)
    work = Path(plan["work_dir"])
    sizes = model_sizes(plan["model_dir"])
    import torch

    threads = torch.get_num_threads()
    peak, peak_cpu = matmul_peak()
    print(f"[bench] fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({threads} threads; "
          f"{peak_cpu / 1e9:.1f} per CPU-second / thread count)", flush=True)
    runs = [r for r in RUNS if r.split(":")[1] in args.modes and r.split(":")[0] in args.trainers
            and r not in args.skip]
    results: dict[str, dict[str, list[dict]]] = {w: {r: [] for r in runs} for w in args.workloads}
    raw: list[dict] = []
    for repeat in range(args.repeats):
        for workload in args.workloads:
            wl = plan["workloads"][workload]
            # A/B/A/B: alternate trainers; the second repeat runs the list backwards to cancel drift
            order = runs if repeat % 2 == 0 else runs[::-1]
            for name in order:
                spec = {
                    "run": name, "model_dir": plan["model_dir"], "train_file": wl["train_file"],
                    "ids_file": wl["ids_file"], "order": wl["order"], "batch_size": args.batch_size,
                    "total_steps": plan["total_steps"], "n_pairs": plan["n_pairs"], "max_length": wl["max_length"],
                    "seed": args.seed, "threads": threads, "cuda": torch.cuda.is_available(),
                    "preftune_options": preftune_options(args),
                }
                tag = f"{workload}-{name.replace(':', '-')}-{repeat}"
                result = launch(spec, work, tag)
                result["matmul_peak"] = [peak, peak_cpu]  # kept with the run, for `render`
                Path(spec["out"]).write_text(json.dumps(result))
                summary = summarize(result, wl["stats"], sizes, (peak, peak_cpu), args.warmup, args.batch_size, plan["n_pairs"])
                summary["repeat"] = repeat
                results[workload][name].append(summary)
                raw.append({"workload": workload, **summary})
                print(f"[bench] {workload:9s} {name:22s} rep {repeat}: e2e {summary['e2e_s']:7.1f}s "
                      f"{summary['pairs_per_s']:.3f} pairs/s, steady {summary['steady_step_s']:.2f} s/step, "
                      f"peak RSS {summary['peak_rss'] / 2**30:.2f} GiB, load {summary['loadavg']:.1f}", flush=True)
    # the machine may be shared: measure the peak again at the end and keep the better value
    peak_end, peak_cpu_end = matmul_peak()
    print(f"[bench] fp32 matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s ({peak_cpu_end / 1e9:.1f} CPU-time)",
          flush=True)
    for workload in results:
        for reps in results[workload].values():
            for r in reps:
                r["mfu_e2e"] *= peak / max(peak, peak_end)
                r["mfu_steady"] *= peak / max(peak, peak_end)
                r["mfu_steady_cpu"] *= peak_cpu / max(peak_cpu, peak_cpu_end)
    peak, peak_cpu = max(peak, peak_end), max(peak_cpu, peak_cpu_end)
    elapsed = time.perf_counter() - started
    report = render(args, plan, sizes, (peak, peak_cpu), results, elapsed)
    out = Path(args.out)
    if out.exists() and KEEP_MARKER in out.read_text():  # keep the hand-written analysis below the marker
        report += "\n" + KEEP_MARKER + out.read_text().split(KEEP_MARKER, 1)[1]
    out.write_text(report)
    (work / "results.json").write_text(json.dumps({"raw": raw, "plan_stats": {w: plan["workloads"][w]["stats"]
                                                                               for w in args.workloads}}))
    print(report)
    print(f"[bench] wrote {args.out} ({elapsed / 60:.1f} min)")


def matrix(args: argparse.Namespace) -> None:
    """Shapes x workloads x runs (issue 15), one subprocess per run; appends one JSON line per run to
    ``<work-dir>/matrix.jsonl`` (``shapes-render`` turns them into SHAPES.md). Runs are
    ``trainer:mode[@checkpointing]``; within a repeat they alternate in the order given (reversed on odd
    repeats)."""
    import torch

    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    out_path = root / "matrix.jsonl"
    threads = torch.get_num_threads()
    peak = matmul_peak()
    print(f"[matrix] fp32 matmul peak {peak[0] / 1e9:.1f} GFLOP/s ({threads} threads)", flush=True)
    for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
        for shape in args.shapes or [args.shape]:
            args.shape = shape
            plan = prepare(args)
            work = Path(plan["work_dir"])
            sizes = model_sizes(plan["model_dir"])
            for workload in args.workloads:
                wl = plan["workloads"][workload]
                for run_name in args.runs if repeat % 2 == 0 else args.runs[::-1]:
                    name, _, ckpt = run_name.partition("@")
                    options = preftune_options(args)
                    if ckpt:
                        options["gradient_checkpointing"] = CKPT_OPTION[ckpt]
                    spec = {
                        "run": name, "model_dir": plan["model_dir"], "train_file": wl["train_file"],
                        "ids_file": wl["ids_file"], "order": wl["order"], "batch_size": args.batch_size,
                        "total_steps": plan["total_steps"], "n_pairs": plan["n_pairs"], "max_length": wl["max_length"],
                        "seed": args.seed, "threads": threads, "cuda": torch.cuda.is_available(),
                        "preftune_options": options,
                    }
                    tag = f"{workload}-{name.replace(':', '-')}{'-' + ckpt if ckpt else ''}-b{args.batch_size}-{repeat}"
                    result = launch(spec, work, tag)
                    summary = summarize(result, wl["stats"], sizes, peak, args.warmup, args.batch_size, plan["n_pairs"])
                    st = wl["stats"]
                    line = {
                        **summary,
                        "shape": shape, "workload": workload, "run": run_name,
                        "checkpointing": ckpt or ("default" if name.startswith("preftune") else "trl default"),
                        "repeat": repeat, "batch": args.batch_size, "max_length": wl["max_length"],
                        "warmup": args.warmup, "steps": args.steps, "threads": threads, "matmul_peak": peak,
                        "sizes": sizes, "tag": args.tag,
                        "tokens_per_step": {k: sum(st[k]) / len(st[k]) for k in
                                            ("pair_tokens", "trl_positions", "pt_tokens", "pt_positions", "scored")},
                        "lengths": st["lengths"],
                    }
                    with open(out_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(line) + "\n")
                    print(f"[matrix] {shape:6s} {workload:9s} {run_name:28s} rep {repeat}: steady "
                          f"{summary['steady_step_s']:.2f} s/step (CPU {summary['steady_cpu_step_s'] / threads:.2f}), "
                          f"e2e {summary['e2e_s']:.1f}s, peak RSS {summary['peak_rss'] / 2**30:.2f} GiB, "
                          f"load {summary['loadavg']:.1f}", flush=True)
    end = matmul_peak()
    print(f"[matrix] fp32 matmul peak at the end {end[0] / 1e9:.1f} GFLOP/s", flush=True)


def stand_in(res: dict, name: str) -> str:
    """``preftune:precomputed`` when it ran, else ``preftune:default`` if that run precomputed."""
    default = res.get("preftune:default") or []
    if name == "preftune:precomputed" and not res.get(name) and default and all(
            r["reference_mode"] == "precomputed" for r in default):
        return "preftune:default"
    return name


def preftune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The preftune options given on the command line; the rest stay at preftune's defaults."""
    options = {"layout": args.layout, "logit_chunk_size": args.logit_chunk_size,
               "pack_length": None if args.pack_length == 0 else args.pack_length,
               "gradient_checkpointing": CKPT_OPTION.get(args.pt_gradient_checkpointing),
               "cpu_allocator": args.pt_cpu_allocator}
    given = {"layout": args.layout, "logit_chunk_size": args.logit_chunk_size, "pack_length": args.pack_length,
             "gradient_checkpointing": args.pt_gradient_checkpointing, "cpu_allocator": args.pt_cpu_allocator}
    return {k: v for k, v in options.items() if given[k] is not None}


# --pt-gradient-checkpointing -> the worker's gradient_checkpointing option; "selective" is not a preftune config
# value (yet): the worker turns preftune's checkpointing off and applies
# preftune.model.checkpointing.enable_checkpointing(model, "selective") to the loaded policy
CKPT_OPTION: dict[str | None, Any] = {None: None, "on": True, "full": True, "off": False, "selective": "selective"}


def effective_preftune_options(args: argparse.Namespace) -> dict[str, Any]:
    from preftune.methods.dpo import DPOConfig

    defaults = DPOConfig.__dataclass_fields__
    keys = ("layout", "pack_length", "logit_chunk_size", "gradient_checkpointing", "cpu_allocator")
    return {k: preftune_options(args).get(k, defaults[k].default) for k in keys}


def render_saved(args: argparse.Namespace) -> None:
    """Rebuild the report from the per-run result files in ``--work-dir`` (e.g. runs made by several
    invocations with the same settings); each run keeps the matmul peak measured in its invocation."""
    work = shape_work_dir(args)
    plan = prepare(args)
    sizes = model_sizes(plan["model_dir"])
    results: dict[str, dict[str, list[dict]]] = {w: {r: [] for r in RUNS} for w in args.workloads}
    peaks = []
    for path in sorted(work.glob("result-*.json")):
        result = json.loads(path.read_text())
        workload, repeat = path.stem.split("-")[1], int(path.stem.rsplit("-", 1)[1])
        if workload not in results or "matmul_peak" not in result:
            continue
        peak = tuple(result["matmul_peak"])
        summary = summarize(result, plan["workloads"][workload]["stats"], sizes, peak, args.warmup,
                            args.batch_size, plan["n_pairs"])
        summary["repeat"] = repeat
        results[workload][result["run"]].append(summary)
        peaks.append(peak)
    results = {w: {r: v for r, v in res.items() if v} for w, res in results.items()}
    report = render(args, plan, sizes, (max(p[0] for p in peaks), max(p[1] for p in peaks)), results, None)
    out = Path(args.out)
    if out.exists() and KEEP_MARKER in out.read_text():
        report += "\n" + KEEP_MARKER + out.read_text().split(KEEP_MARKER, 1)[1]
    out.write_text(report)
    print(report)


def render(args, plan, sizes, peaks, results, elapsed) -> str:
    peak, peak_cpu = peaks
    cmd = "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:])
    vers, mach = versions(), machine()
    lines = [
        "# preftune vs TRL DPOTrainer: speed and memory",
        "",
        "Generated by `benchmarks/bench_dpo.py` (issue 5); run by hand, never in CI. See the script's docstring "
        "for the method, and the notes below for what the numbers mean.",
        "",
        "Across model shapes (LM head 50% / 20% / 5% of the matmul parameters), workloads, checkpointing modes, "
        "memory against the floor and scaling with sequence length (issue 15): [SHAPES.md](SHAPES.md).",
        "",
        f"Command: `{cmd.strip()}`" + (f" ({elapsed / 60:.1f} min)" if elapsed else ""),
        "",
        f"Machine: {mach['cpu']} ({mach['cores']} cores, {mach['memory_gib']} GiB, CUDA: {mach['cuda']}); "
        f"torch threads {mach['torch_threads']}; fp32 matmul peak measured in this run (best of start and end): "
        f"**{peak / 1e9:.1f} GFLOP/s** per wall second, {peak_cpu / 1e9:.1f} GFLOP/s per CPU second / threads.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        f"Model: Llama, 8 layers, hidden 512, 8 heads, intermediate 1376, vocab 50257, untied; "
        f"{sizes['non_embedding'] / 1e6:.2f}M non-embedding parameters, LM head {sizes['head'] / 1e6:.2f}M. "
        f"fp32, batch {args.batch_size} pairs, max_length {args.max_length}, beta 0.1, AdamW lr 1e-6, linear decay, "
        f"grad clip 1.0, dropout off; {args.warmup} warm-up + {args.steps} timed steps per run, "
        f"{args.repeats} repeat(s) alternated; preftune options: "
        + ", ".join(f"{k} {v}" for k, v in effective_preftune_options(args).items())
        + (" (preftune's defaults)" if not preftune_options(args) else " (overridden on the command line)") + ".",
        "",
    ]
    for workload in args.workloads:
        st = plan["workloads"][workload]["stats"]
        ln = st["lengths"]
        lines += [
            f"## Workload `{workload}`",
            "",
            f"{plan['n_pairs']} pairs; tokens per pair: prompt {ln['prompt']['mean']:.1f} (min {ln['prompt']['min']}, "
            f"max {ln['prompt']['max']}), chosen {ln['chosen']['mean']:.1f} (max {ln['chosen']['max']}), rejected "
            f"{ln['rejected']['mean']:.1f} (max {ln['rejected']['max']}). Per step on average: "
            f"{sum(st['pair_tokens']) / len(st['pair_tokens']):.0f} real tokens as TRL runs them "
            f"({sum(st['trl_positions']) / len(st['trl_positions']):.0f} positions with padding), "
            f"{sum(st['pt_tokens']) / len(st['pt_tokens']):.0f} as preftune `{effective_preftune_options(args)['layout']}` runs them "
            f"({sum(st['pt_positions']) / len(st['pt_positions']):.0f} positions), "
            f"{sum(st['scored']) / len(st['scored']):.0f} scored tokens.",
            "",
            "| run | e2e pairs/s | e2e tokens/s | steady s/step | steady pairs/s | CPU-time e2e pairs/s | "
            "CPU-time steady s/step | peak RSS GiB | MFU e2e | MFU steady | MFU steady (CPU-time) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        res = results[workload]
        for name, reps in res.items():
            if not reps:
                continue
            m = {k: median([r[k] for r in reps]) for k in (
                "pairs_per_s", "tokens_per_s", "steady_step_s", "steady_pairs_per_s", "cpu_pairs_per_s",
                "steady_cpu_step_s", "peak_rss", "mfu_e2e", "mfu_steady", "mfu_steady_cpu")}
            threads = reps[0].get("threads", 1)
            lines.append(f"| `{name}` | {m['pairs_per_s']:.3f} | {m['tokens_per_s']:.0f} | {m['steady_step_s']:.2f} | "
                         f"{m['steady_pairs_per_s']:.3f} | {m['cpu_pairs_per_s']:.3f} | "
                         f"{m['steady_cpu_step_s'] / threads:.2f} | {m['peak_rss'] / 2**30:.2f} | "
                         f"{100 * m['mfu_e2e']:.1f}% | {100 * m['mfu_steady']:.1f}% | {100 * m['mfu_steady_cpu']:.1f}% |")
        lines += ["", "| comparison | e2e pairs/s ratio (per repeat) | steady ratio | CPU-time e2e ratio | "
                  "CPU-time steady ratio | peak RSS ratio | target |", "|---|---:|---:|---:|---:|---:|---|"]
        for label, a, b in COMPARISONS:
            a = stand_in(res, a)
            if not (res.get(a) and res.get(b)):
                continue
            ratios = [x["pairs_per_s"] / y["pairs_per_s"] for x, y in zip(res[a], res[b])]
            steady = [x["steady_pairs_per_s"] / y["steady_pairs_per_s"] for x, y in zip(res[a], res[b])]
            mem = [x["peak_rss"] / y["peak_rss"] for x, y in zip(res[a], res[b])]
            cpu = [x["cpu_pairs_per_s"] / y["cpu_pairs_per_s"] for x, y in zip(res[a], res[b])]
            cpu_steady = [x["steady_cpu_pairs_per_s"] / y["steady_cpu_pairs_per_s"] for x, y in zip(res[a], res[b])]
            target = ">= 2.0x speed, <= 0.5x memory" if a == "preftune:default" and b == "trl:default" else ">= 1.5x speed"
            lines.append(f"| {label}: `{a}` / `{b}` | **{median(ratios):.2f}x** ({', '.join(f'{r:.2f}' for r in ratios)}) "
                         f"| {median(steady):.2f}x | {median(cpu):.2f}x | {median(cpu_steady):.2f}x | "
                         f"{median(mem):.2f}x | {target} |")
        lines += ["", f"Numerics, first {args.numerics_steps} steps (repeat 0), max relative difference "
                  "preftune vs TRL (max absolute in brackets); last column: max |margin difference| / "
                  "(beta * max |logps|), i.e. against the size of the summed log-probs the margin is a difference of:",
                  "", "| comparison | loss | rewards/margins | grad_norm | margins vs beta*|logps| |",
                  "|---|---:|---:|---:|---:|"]
        for label, a, b in COMPARISONS:
            a = stand_in(res, a)
            if not (res.get(a) and res.get(b)):
                continue
            num = numerics(res[a][0], res[b][0], args.numerics_steps)
            cells = [f"{num[k]['max_rel']:.1e} [{num[k]['max_abs']:.1e}]" if k in num else "n/a"
                     for k in ("loss", "rewards/margins", "grad_norm")]
            cells.append(f"{num['rewards/margins'].get('abs_over_beta_logps', float('nan')):.1e}"
                         if "rewards/margins" in num else "n/a")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        first = res.get("preftune:default") or next(iter(v for v in res.values() if v))
        trl_first = res.get("trl:model") or res.get("trl:default") or []
        if first and trl_first:
            lines += ["", "Per step (repeat 0), preftune default / TRL separate reference:", "",
                      "| step | loss | rewards/margins | grad_norm |", "|---:|---|---|---|"]
            for s, (x, y) in enumerate(zip(first[0]["metrics"][: args.numerics_steps],
                                           trl_first[0]["metrics"][: args.numerics_steps])):
                cells = [f"{x.get(k, float('nan')):.7g} / {y.get(k, float('nan')):.7g}"
                         for k in ("loss", "rewards/margins", "grad_norm")]
                lines.append(f"| {s + 1} | " + " | ".join(cells) + " |")
        lines += ["", "Every run (the spread shows the noise of this machine; load = 1-min load average, max of "
                  "start/end; CPU s = user + system time of the worker):", "",
                  "| run | repeat | e2e s | first step ends at s | steady s/step | CPU s (user + sys) | load | peak RSS GiB"
                  + (" | GPU peak GiB |" if any(r.get("gpu_peak") for v in res.values() for r in v) else " |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if any(r.get("gpu_peak") for v in res.values()
                                                                                for r in v) else "")]
        for name, reps in res.items():
            for r in reps:
                gpu = f" {r['gpu_peak'] / 2**30:.2f} |" if r.get("gpu_peak") else ""
                lines.append(f"| `{name}` | {r['repeat']} | {r['e2e_s']:.1f} | {r['first_step_end_s']:.1f} | "
                             f"{r['steady_step_s']:.2f} | {r['user_s']:.0f} + {r['sys_s']:.0f} | {r['loadavg']:.1f} | "
                             f"{r['peak_rss'] / 2**30:.2f} |{gpu}")
        bad = [r["token_mismatches"] for reps in res.values() for r in reps if r.get("token_mismatches")]
        lines += ["", "Token ids TRL trained on vs preftune's: " + (f"**{sum(bad)} mismatches**" if bad else
                                                                     "identical in every TRL run") + ".", ""]
    lines += [
        "## Notes",
        "",
        "* e2e = from the start of the run (model load, data tokenization, reference load, any reference "
        "precompute pass) to the end of the last optimizer step, excluding interpreter start and imports; pairs/s "
        "and tokens/s count every trained pair/token (warm-up included). e2e tokens/s counts the pairs' real "
        "tokens as TRL runs them (prompt twice + chosen + rejected) for both trainers, so its ratio equals the "
        "pairs/s ratio. steady = the timed steps only (after warm-up).",
        "* peak RSS = `getrusage(RUSAGE_SELF).ru_maxrss` of the worker process (one process per run), imports "
        "included (about "
        + ", ".join(f"{name}: {median([r['import_rss'] for w in results.values() for r in w.get(name, [])]) / 2**30:.2f} GiB"
                    for name in ("preftune:default", "trl:model") if any(w.get(name) for w in results.values()))
        + " after imports).",
        "* MFU uses the FLOP model of the script docstring (tokens the layout actually runs; the LM head only at "
        "scored positions; no credit for recomputation or padding) over the fp32 matmul peak measured above.",
        "* Results are medians over repeats; ratios are taken per repeat (A/B/A/B in one invocation).",
        "* CPU-time columns divide by the worker's CPU time (user + system, all threads) / thread count instead "
        "of wall time: what the run would take with its cores to itself. They are the robust numbers when other "
        "jobs share the machine (see the load column); CPU-time s/step is CPU seconds / threads.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# profile: torch.profiler over a few preftune steps
# ---------------------------------------------------------------------------------------------
def profile(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, record_function, schedule

    import preftune.engine.loop as loop
    import preftune.model.logps as logps
    import preftune.model.reference as reference
    from preftune.methods.dpo import train_dpo

    args.workloads = [args.workload]
    args.warmup, args.steps = 1, args.profile_steps + 1
    plan = prepare(args)
    wl = plan["workloads"][args.workload]

    def labelled(fn, label):
        def wrapped(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapped

    # phase labels, benchmark-side only (monkeypatched, nothing in preftune changes)
    logps.SequenceScorer.forward = labelled(logps.SequenceScorer.forward, "## policy/reference forward (SequenceScorer)")
    reference.FrozenReference.__call__ = labelled(reference.FrozenReference.__call__, "## reference (FrozenReference)")
    logps._token_logps = labelled(logps._token_logps, "## LM head chunk (_token_logps)")
    loop.Trainer._train_step = labelled(loop.Trainer._train_step, "## train step (fwd+bwd)")
    orig_collate = loop.Trainer.__init__

    def init(self, *a, **k):
        orig_collate(self, *a, **k)
        if hasattr(self, "collate"):  # older Trainer versions collated in the trainer
            self.collate = labelled(self.collate, "## collate")
    loop.Trainer.__init__ = init
    torch.optim.AdamW.step = labelled(torch.optim.AdamW.step, "## optimizer step")

    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                  schedule=schedule(wait=1, warmup=1, active=args.profile_steps, repeat=1))
    tmp = Path(tempfile.mkdtemp(prefix="bench-prof-"))
    options = preftune_options(args)
    ckpt = None
    if options.get("gradient_checkpointing") == "selective":
        options["gradient_checkpointing"], ckpt = False, "selective"
    patch_load_policy(ckpt, label_recompute=True)
    default_ref = args.reference in ("auto", "default")
    config = dict(model=plan["model_dir"], train_file=wl["train_file"], batch_size=args.batch_size,
                  max_steps=plan["total_steps"], learning_rate=1e-6, max_length=wl["max_length"], max_prompt_length=None,
                  loss_params={"beta": 0.1}, logging_steps=1, progress_bar=False,
                  save_final=False, output_dir=str(tmp / "out"), seed=args.seed, disable_dropout=True,
                  reference_cache_dir=str(tmp / "cache") if default_ref or args.reference == "precomputed" else None,
                  **options)
    if not default_ref:
        config["reference"] = args.reference
    times = []
    with prof:
        train_dpo(config, callbacks=[lambda step, row: (times.append(time.perf_counter()), prof.step())])
    shutil.rmtree(tmp, ignore_errors=True)
    steps = [b - a for a, b in zip(times, times[1:])]
    print(f"step times: {', '.join(f'{s:.2f}' for s in steps)} s")
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    labels = [e for e in avg if e.key.startswith("## ")]
    print("phases (inclusive CPU time, all profiled steps):")
    for e in sorted(labels, key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:48s} {e.cpu_time_total / 1e6:8.2f} s  x{e.count}")
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    vocab = model_sizes(plan["model_dir"])["vocab"]
    cats = categories(prof, vocab)
    print(f"self time by category, per step ({args.profile_steps} steps profiled):")
    for name, seconds in cats.items():
        print(f"  {name:60s} {seconds / args.profile_steps:7.2f} s")
    if args.profile_out:
        # the profiled steps' wall time: steps[1] onwards are warm-up + active; take the active ones
        active = steps[-args.profile_steps:]
        line = {"shape": args.shape, "workload": args.workload, "checkpointing": args.pt_gradient_checkpointing or "default",
                "reference": args.reference, "batch": args.batch_size, "threads": torch.get_num_threads(),
                "profiled_steps": args.profile_steps, "step_s": active,
                "categories_per_step": {k: v / args.profile_steps for k, v in cats.items()},
                "loadavg": os.getloadavg()[0]}
        with open(args.profile_out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)


def categories(prof, vocab: int) -> dict[str, float]:
    """Self CPU seconds of the profiled steps by kind of work (ops inside ``optimizer step`` counted there;
    ops inside a checkpointed layer's replay in backward counted as recompute)."""
    from torch.autograd import DeviceType  # noqa: F401  (ensures the autograd profiler types are loaded)

    events = prof.events()

    def ranges(name: str) -> list[tuple[int, int]]:
        return sorted((e.time_range.start, e.time_range.end) for e in events if e.name == name)

    opt_ranges = ranges("## optimizer step")
    recompute_ranges = ranges("## recompute (checkpoint replay)")
    keys = ("LM head: matmuls with the vocab dimension", "LM head: elementwise on [*, vocab] tensors",
            "decoder matmuls (mm/addmm/bmm), forward + backward", "attention (scaled_dot_product kernels, fwd + bwd)",
            "recompute: decoder matmuls (checkpoint replay)", "recompute: attention (checkpoint replay)",
            "recompute: other ops (checkpoint replay)", "optimizer step (AdamW foreach)",
            "other ops (norms, rotary, SiLU, residuals, copies, autograd bookkeeping)")
    out = {k: 0.0 for k in keys}
    matmuls = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")

    def inside(start: int, rs: list[tuple[int, int]]) -> bool:
        import bisect

        i = bisect.bisect_right(rs, (start, float("inf"))) - 1
        return i >= 0 and rs[i][0] <= start <= rs[i][1]

    for e in events:
        if e.name.startswith("## ") or e.name.startswith("ProfilerStep"):
            continue
        t = e.self_cpu_time_total / 1e6
        start = e.time_range.start
        shapes = [s for s in (e.input_shapes or []) if s]
        with_vocab = any(vocab in s for s in shapes)
        attention = "scaled_dot_product" in e.name or "flash_attention" in e.name
        if inside(start, opt_ranges):
            out[keys[7]] += t
        elif inside(start, recompute_ranges):
            out[keys[4] if e.name in matmuls else keys[5] if attention else keys[6]] += t
        elif e.name in matmuls:
            out[keys[0] if with_vocab else keys[2]] += t
        elif attention:
            out[keys[3]] += t
        elif with_vocab:
            out[keys[1]] += t
        else:
            out[keys[8]] += t
    return out


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "worker", "profile", "render", "matrix",
                                                                       "shapes-render"))
    parser.add_argument("--spec", help="(internal) worker spec file")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "preftune-bench"))
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    parser.add_argument("--hh-file", default=str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"))
    parser.add_argument("--workloads", default="hh,synthetic", type=lambda s: s.split(","))
    parser.add_argument("--modes", default="model,default,precomputed", type=lambda s: s.split(","),
                        help="reference modes to run: model (2a), default (TRL default, 1), precomputed (2b)")
    parser.add_argument("--trainers", default="preftune,trl", type=lambda s: s.split(","))
    parser.add_argument("--skip", default=[], type=lambda s: s.split(","),
                        help="runs to leave out, e.g. preftune:precomputed when preftune's default resolves to it "
                             "(comparison 2b then uses the preftune:default run)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="A/B repeats (runs alternate within a repeat)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps, 1 repeat")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="stock", help=f"model shape: {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    # matrix (issue 15): shapes x workloads x runs, one summary line per run appended to <work-dir>/matrix.jsonl
    parser.add_argument("--shapes", default=[], type=lambda s: s.split(","), help="matrix: shapes")
    parser.add_argument("--runs", default="preftune:default,trl:default", type=lambda s: s.split(","),
                        help="matrix: runs, trainer:mode[@checkpointing], e.g. preftune:default@selective")
    parser.add_argument("--tag", default="", help="matrix: a label stored with each result line")
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="matrix: number of the first repeat (a later invocation adding repeats; odd = reversed order)")
    parser.add_argument("--profile-out", help="profile: append the per-step category seconds (JSON line) here")
    parser.add_argument("--numerics-steps", type=int, default=5)
    # preftune options: left out = preftune's own defaults (what "preftune default" means in the report)
    parser.add_argument("--layout", default=None, help="preftune layout")
    parser.add_argument("--pack-length", type=int, default=None, help="preftune pack_length (0 = none)")
    parser.add_argument("--logit-chunk-size", type=int, default=None, help="preftune logit_chunk_size")
    parser.add_argument("--pt-gradient-checkpointing", choices=("on", "off", "full", "selective"), default=None,
                        help="preftune gradient_checkpointing (on = full; selective: "
                             "preftune.model.checkpointing, applied by the worker)")
    parser.add_argument("--pt-cpu-allocator", choices=("auto", "fast", "lean", "system"), default=None,
                        help="preftune cpu_allocator")
    # profile
    parser.add_argument("--workload", default="hh", help="profile: one workload (hh, synthetic, long, fixed<L>)")
    parser.add_argument("--reference", default="model", help="profile: preftune reference mode")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", help="profile: write a Chrome trace here")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.repeats = 1, 3, 1
        args.numerics_steps = min(args.numerics_steps, 4)
    for w in args.workloads + [args.workload]:
        if w not in WORKLOADS and not re.fullmatch(r"fixed\d+(p\d+)?", w):
            parser.error(f"unknown workload {w!r}")
    for shape in [args.shape] + args.shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "worker":
        worker(args.spec)
    elif args.command == "profile":
        profile(args)
    elif args.command == "render":
        render_saved(args)
    elif args.command == "matrix":
        matrix(args)
    elif args.command == "shapes-render":
        import shapes_report

        shapes_report.render(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
