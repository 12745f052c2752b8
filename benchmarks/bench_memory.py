"""Peak RSS of a preftune DPO run and where it happens (run by hand, never in CI).

    python benchmarks/bench_memory.py MODEL_DIR TRAIN_FILE [--steps 4] [--checkpointing full]
        [--cpu-allocator auto|fast|lean|system] [--cpu-linear auto|onednn|torch] [--optimizer-in-backward]

A thread samples the process's RSS every 2 ms; at every new peak (by 20 MiB) it records the main
thread's Python stack, so the output says which phase (model load, reference pass, forward,
backward, optimizer) holds the peak. It prints the peak against the floor of weights + gradients
+ AdamW state (16 bytes per trainable parameter) and the logged tokens/s of each step.
SHAPES.md ("Memory against the floor") uses it on the `floor` model of ``bench_dpo.py``
(``<work-dir>/floor/model`` and ``floor/fixed1024.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def parse_args() -> argparse.Namespace:
    from preftune.hardware.allocator import ALLOCATOR_SETTINGS
    from preftune.hardware.cpu_linear import CPU_LINEAR_SETTINGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("train_file")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--checkpointing", default="full", choices=("full", "selective", "off"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-allocator", default="auto", choices=ALLOCATOR_SETTINGS)
    parser.add_argument("--cpu-linear", default="auto", choices=CPU_LINEAR_SETTINGS)
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="optimizer_in_backward: true (and max_grad_norm: null, which it needs)")
    parser.add_argument("--out", help="append the result as one JSON line here "
                                      "(e.g. benchmarks/shapes-data/memory.jsonl)")
    return parser.parse_args()


def watch_peak(proc: Any) -> dict[str, Any]:
    """Starts a thread that samples ``proc``'s RSS every 2 ms and, at every new peak (by 20 MiB), records
    the main thread's Python stack; returns the dict it updates (``rss``, ``where``)."""
    main_thread = threading.get_ident()
    peak: dict[str, Any] = {"rss": 0, "where": ""}

    def sample() -> None:
        while True:
            rss = proc.memory_info().rss
            if rss > peak["rss"] + 20 * 2**20:
                stack = traceback.extract_stack(sys._current_frames().get(main_thread))
                peak["rss"] = rss
                peak["where"] = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                                            for f in stack[::-1][:6])
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``train_dpo`` with the given settings in a scratch directory; its metrics lines."""
    from preftune.methods.dpo import train_dpo

    work = Path(tempfile.mkdtemp(prefix="preftune-mem-"))
    try:
        train_dpo({"model": args.model, "train_file": args.train_file, "output_dir": str(work / "run"),
                   "batch_size": args.batch_size, "max_steps": args.steps, "max_length": args.max_length,
                   "max_prompt_length": None, "save_steps": 0, "progress_bar": False, "logging_steps": 1,
                   "gradient_checkpointing": args.checkpointing, "reference_cache_dir": str(work / "cache"),
                   "cpu_allocator": args.cpu_allocator, "cpu_linear": args.cpu_linear,
                   "optimizer_in_backward": args.optimizer_in_backward,
                   "max_grad_norm": None if args.optimizer_in_backward else 1.0})
        return [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    args = parse_args()
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    proc = psutil.Process()
    peak = watch_peak(proc)
    from safetensors import safe_open

    import preftune.methods.dpo  # noqa: F401  (counted in the imports' memory below)

    trainable = 0  # counted from the files' headers: loading the model here would change the peak
    for f in sorted(Path(args.model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as weights:
            trainable += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    imports = proc.memory_info().rss  # the interpreter, torch, transformers: before any model is loaded
    rows = train(args)
    floor = 16 * trainable
    print(f"peak RSS {peak['rss'] / 2**30:.2f} GiB = {peak['rss'] / floor:.2f}x the floor "
          f"({floor / 2**30:.2f} GiB: weights + gradients + AdamW state of {trainable / 1e6:.1f}M "
          "parameters)")
    print(f"without the {imports / 2**30:.2f} GiB of interpreter and imports: "
          f"{(peak['rss'] - imports) / floor:.2f}x the floor")
    print(f"at: {peak['where']}")
    tokens_per_s = [round(r["tokens_per_s"], 1) for r in rows if "tokens_per_s" in r]
    print("tokens/s per step:", tokens_per_s)
    if args.out:
        line = {"peak_rss": peak["rss"], "import_rss": imports, "floor": floor, "ratio": peak["rss"] / floor,
                "ratio_without_imports": (peak["rss"] - imports) / floor, "where": peak["where"],
                "tokens_per_s": tokens_per_s, "checkpointing": args.checkpointing,
                "cpu_allocator": args.cpu_allocator, "cpu_linear": args.cpu_linear,
                "optimizer_in_backward": args.optimizer_in_backward, "steps": args.steps,
                "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                "model": Path(args.model).name}
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
