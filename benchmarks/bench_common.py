"""Pieces every benchmark script shares: where things are, package versions and the machine, the model
shapes, workloads and runs of ``bench_dpo.py`` (which ``shapes_report.py`` reads too), and small helpers.
Imports nothing heavy at the top: the DPO workers measure the memory of their own imports."""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("PREFTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "pyarrow", "preftune")
#: a rewritten report keeps everything below this line
KEEP_MARKER = "<!-- hand-written analysis below; bench_dpo.py keeps it when it rewrites this file -->"

# ---- bench_dpo.py: model shapes, workloads, runs --------------------------------------------------------
#: the issue-5 model (GPT-2 tokenizer)
MODEL_CONFIG = dict(
    vocab_size=50257, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=50256,
    eos_token_id=50256, attention_dropout=0.0,
)
# the shape matrix (issue 15): one decoder (4 x 512, ffn 1408, 8 heads: 12.85M matmul parameters) and three
# vocabularies that set the LM head's share of the matmul parameters; "floor" is the >= 100M-parameter
# model of the memory-floor check
_SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0,
              eos_token_id=0, attention_dropout=0.0)
SHAPES: dict[str, dict[str, Any]] = {
    "stock": {"config": MODEL_CONFIG, "tokenizer": "gpt2"},
    "head50": {"config": {**_SMALL, "vocab_size": 25088}, "tokenizer": "bpe"},  # head 50.0% of matmul params
    "head20": {"config": {**_SMALL, "vocab_size": 6272}, "tokenizer": "bpe"},  # 20.0%
    "head5": {"config": {**_SMALL, "vocab_size": 1280}, "tokenizer": "bpe"},  # 4.9%
    "floor": {"config": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, attention_dropout=0.0,
                             vocab_size=32000),
              "tokenizer": "bpe"},  # 134M parameters, head 22% of matmul params
}
# workloads: hh (real pairs), synthetic (= "short": prompt 64, completions 64-192), long (prompt 150,
# completions 300-600, max_length >= 1024); besides, fixed<L>[p<P>] (every sequence L tokens)
WORKLOADS = ("hh", "synthetic", "long")
#: (trainer, mode): the runs of one repeat, in the order they alternate
RUNS = {
    "preftune:default": "preftune defaults (reference auto -> precomputed in the run when the run "
                        "covers the data)",
    "trl:default": "TRL DPOConfig defaults (gradient checkpointing on, separate reference model), fp32",
    "preftune:model": "preftune, separate frozen reference model scored every step (other options default)",
    "trl:model": "TRL, separate reference model, gradient checkpointing off",
    "preftune:precomputed": "preftune, reference: precomputed (cache built in the run)",
    "trl:precomputed": "TRL, precompute_ref_log_probs=True, gradient checkpointing off",
}
COMPARISONS = (  # (label, preftune run, TRL run)
    ("(1) default vs default", "preftune:default", "trl:default"),
    ("(2a) separate reference model, both", "preftune:model", "trl:model"),
    ("(2b) precomputed reference, both", "preftune:precomputed", "trl:precomputed"),
)


def param_counts(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of an untied Llama config: ``decoder`` = its layers' matmul weights (q, o: h x h;
    k, v: h x kv; gate, up, down: h x ffn per layer), ``norms`` = two RMSNorms a layer + the final one,
    ``head`` = ``embedding`` = h x V."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return {"decoder": layers * (2 * h * h + 2 * h * kv + 3 * h * i), "norms": layers * 2 * h + h,
            "head": h * v, "embedding": v * h, "hidden": h, "vocab": v, "layers": layers, "ffn": i,
            "heads": cfg["num_attention_heads"]}


# ---- machine and versions -------------------------------------------------------------------------------
def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python's and each package's installed version ("not installed" where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def versions_line() -> str:
    return "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())


def cpu_model() -> str:
    """The CPU's model name (lscpu), else what ``platform`` knows."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def machine() -> dict[str, Any]:
    """CPU, cores, memory, torch's thread count and whether CUDA is there (imports torch)."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def machine_text(mach: dict[str, Any] | None = None) -> str:
    """``CPU (N cores, M GiB, CUDA: x)`` of a :func:`machine` dict (default: this machine's)."""
    mach = mach or machine()
    return f"{mach['cpu']} ({mach['cores']} cores, {mach['memory_gib']} GiB, CUDA: {mach['cuda']})"


# ---- small helpers --------------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def with_hand_written(out: Path, report: str) -> str:
    """``report`` followed by the hand-written part of the existing ``out`` (below :data:`KEEP_MARKER`),
    when it has one."""
    if out.exists() and KEEP_MARKER in out.read_text():
        return report + "\n" + KEEP_MARKER + out.read_text().split(KEEP_MARKER, 1)[1]
    return report


def hh_rows(hh_file: Path) -> Iterator[tuple[dict[str, str], tuple[str, str, str] | None]]:
    """Each Anthropic HH row and its (prompt, chosen, rejected) split at the shared prompt; None where
    a reply is empty or both are equal (no preference to learn)."""
    from preftune.data.formats import split_implicit_prompt

    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            p, c, r = split_implicit_prompt(row["chosen"], row["rejected"])
            yield row, ((p, c, r) if c.strip() and r.strip() and c != r else None)
