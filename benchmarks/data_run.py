"""``bench_data.py run`` and ``trl-worker``: one trainer in a child process until its first optimizer step,
timed, its process tree's memory polled; one JSON line appended to ``data-scale/results.jsonl``."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from bench_common import HERE, REPO, cpu_model, memory_gib, versions
from data_generate import meta_path

EMBEDDED = REPO / "src" / "preftune" / "assets" / "stories260k"
WORK_DIR = Path(tempfile.gettempdir()) / "preftune-data-bench"
RESULTS = HERE / "data-scale" / "results.jsonl"
BUDGETS = {"max_length": 512, "max_prompt_length": 256, "batch_size": 8}
MARK = "BENCH-DATA "  # prefix of the TRL child's timing lines


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process in KiB; (0, 0) when it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, anon


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def measure(cmd: list[str], env: dict[str, str], cwd: Path, markers: dict[str, str], max_anon_gib: float,
            timeout: float | None) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak memory of its process tree, exit status, the seconds (from the start)
    at which each ``markers`` regex first matched an output line, and the last output lines."""
    lines: deque[str] = deque(maxlen=60)
    seen: dict[str, float] = {}
    patterns = {name: re.compile(rx) for name, rx in markers.items()}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line.rstrip("\n"))
            for name, rx in patterns.items():
                if name not in seen and rx.search(line):
                    seen[name] = now

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak_rss = peak_anon = 0
    killed = None
    while proc.poll() is None:
        totals = [_status_kib(pid) for pid in _tree(proc.pid)]
        rss, anon = sum(t[0] for t in totals) * 1024, sum(t[1] for t in totals) * 1024
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        elapsed = time.perf_counter() - start
        if anon > max_anon_gib * 2**30:
            killed = f"anonymous memory {anon / 2**30:.1f} GiB > --max-anon-gib {max_anon_gib}"
        elif timeout and elapsed > timeout:
            killed = f"timeout {timeout:.0f} s"
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what this run started
            break
        time.sleep(0.2)
    proc.wait()
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    ru_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"exit": proc.returncode, "killed": killed, "wall_s": round(wall, 2), "markers_s": seen,
            "polled_peak_rss": peak_rss, "polled_peak_anon": peak_anon, "ru_maxrss": ru_maxrss,
            "peak_rss_gib": round(max(peak_rss, ru_maxrss) / 2**30, 3),
            "peak_anon_gib": round(peak_anon / 2**30, 3),
            "tail": list(lines)[-30:]}


def _file_info(path: Path) -> dict[str, Any]:
    meta_file = meta_path(path)
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("bytes") == path.stat().st_size:
            return meta
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        pairs = sum(1 for _ in f)
    return {"file": str(path), "pairs": pairs, "bytes": path.stat().st_size}


def _child(args: argparse.Namespace, path: Path, cache: Path,
           scratch: Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The child's command line, environment and output markers (name -> regex) of ``--trainer``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    b = BUDGETS
    if args.trainer == "preftune":
        env["XDG_CACHE_HOME"] = str(cache)
        cmd = [sys.executable, "-m", "preftune", "dpo", "--model", "embedded", "--train_file", str(path),
               "--max_steps", "1", "--output_dir", str(scratch / "out"), "--batch_size", str(b["batch_size"]),
               "--progress_bar", "false", "--max_length", str(b["max_length"]),
               "--max_prompt_length", str(b["max_prompt_length"]), "--precision", "fp32"]
        return cmd, env, {"steps_line_s": r"\bsteps:", "done_s": r"^done:"}
    env["HF_DATASETS_CACHE"] = str(cache)
    cmd = [sys.executable, str(HERE / "bench_data.py"), "trl-worker", "--file", str(path),
           "--cache-dir", str(cache), "--scratch", str(scratch)]
    markers = {name + "_s": "^" + re.escape(MARK + name) + r"\b"
               for name in ("imported", "loaded", "trainer_ready", "first_step_end")}
    return cmd, env, markers


def run(args: argparse.Namespace) -> None:
    path = Path(args.file).resolve()
    info = _file_info(path)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir).resolve() if args.cache_dir else Path(
        tempfile.mkdtemp(prefix=f"cache-{args.trainer}-", dir=work))
    if args.fresh_cache and cache.exists():
        shutil.rmtree(cache)
    cold = not cache.exists() or not any(cache.iterdir())
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"run-{args.trainer}-", dir=work))
    cmd, env, markers = _child(args, path, cache, scratch)
    print(f"{args.trainer} {'cold' if cold else 'cached'}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        m = measure(cmd, env, scratch, markers, args.max_anon_gib, args.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    result = _result(args, info, path, cache, cold, cmd, m)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    shown = {k: result[k] for k in ("label", "trainer", "mode", "pairs", "ok", "first_step_s", "wall_s",
                                    "peak_rss_gib", "peak_anon_gib", "prep_pairs_per_s")}
    print(json.dumps(shown))
    if not result["ok"]:
        print("\n".join(m["tail"]), file=sys.stderr)
        killed = ", " + m["killed"] if m["killed"] else ""
        raise SystemExit(f"{args.trainer} run failed: exit {m['exit']}{killed}")


def _result(args: argparse.Namespace, info: dict[str, Any], path: Path, cache: Path, cold: bool,
            cmd: list[str], m: dict[str, Any]) -> dict[str, Any]:
    """The run's JSON line: what ran on what, the time to step 1, the memory, the machine and versions."""
    ok = m["exit"] == 0 and not m["killed"]
    first = m["wall_s"] if args.trainer == "preftune" else m["markers_s"].get("first_step_end_s")
    if args.trainer == "preftune" and "done_s" not in m["markers_s"]:
        first = None  # it did not finish its step
    result: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "label": args.label, "trainer": args.trainer,
        "mode": "cold" if cold else "cached", "file": str(path), "pairs": info["pairs"],
        "file_bytes": info["bytes"], "uncompressed_bytes": info.get("uncompressed_bytes", info["bytes"]),
        "mean_completion_chars": info.get("mean_completion_chars"), "generate_command": info.get("command"),
        "ok": ok, "exit": m["exit"], "killed": m["killed"],
        "first_step_s": round(first, 2) if ok and first is not None else None,
        "wall_s": m["wall_s"], **{k: round(v, 2) for k, v in m["markers_s"].items()},
        "peak_rss_gib": m["peak_rss_gib"], "peak_anon_gib": m["peak_anon_gib"],
        "polled_peak_rss_gib": round(m["polled_peak_rss"] / 2**30, 3),
        "ru_maxrss_gib": round(m["ru_maxrss"] / 2**30, 3),
        "prep_pairs_per_s": round(info["pairs"] / first, 1) if ok and first else None,
        "budgets": BUDGETS, "cache_dir": str(cache) if args.cache_dir else None,
        "command": shlex.join(["python", "benchmarks/bench_data.py", *sys.argv[1:]]),
        "child_command": shlex.join(cmd), "machine": machine(), "versions": versions(),
        "source": source_state(),
    }
    if args.trainer == "trl":
        result["trl_max_prompt_length"] = _trl_has_max_prompt_length()
    if not ok:
        result["tail"] = m["tail"]
    return result


def _trl_has_max_prompt_length() -> bool | None:
    try:
        from trl import DPOConfig
    except ImportError:
        return None
    return "max_prompt_length" in DPOConfig.__dataclass_fields__


def trl_worker(args: argparse.Namespace) -> None:
    """The TRL arm, in its own process: load, tokenize (inside DPOTrainer), one optimizer step."""
    def mark(name: str) -> None:
        print(MARK + name, flush=True)

    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    mark("imported")
    dataset = load_dataset("json", data_files=args.file, split="train", cache_dir=args.cache_dir)
    mark("loaded")

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            mark("first_step_end")
            control.should_training_stop = True

    options: dict[str, Any] = {}
    if _trl_has_max_prompt_length():
        options["max_prompt_length"] = BUDGETS["max_prompt_length"]
    config = DPOConfig(
        output_dir=str(Path(args.scratch) / "out"), per_device_train_batch_size=BUDGETS["batch_size"],
        max_steps=1, learning_rate=1e-6, beta=0.1, max_length=BUDGETS["max_length"], bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, **options,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED))
    trainer = DPOTrainer(model=str(EMBEDDED), args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[FirstStep()])
    mark("trainer_ready")
    trainer.train()
    mark("done")


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
            "os": platform.platform()}


def source_state() -> dict[str, Any]:
    """The commit of the checkout and whether src/ had uncommitted changes (the data path was being
    rewritten)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "src_dirty": bool(git("status", "--porcelain", "--", "src"))}
