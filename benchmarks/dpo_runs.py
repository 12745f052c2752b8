"""``bench_dpo.py run``, ``render`` and ``matrix``: the runs of an invocation, each in its own worker
process (``bench_dpo.py worker``), alternated A/B/A/B, summarised into RESULTS.md (``run``, ``render``) or
appended as JSON lines to ``<work-dir>/matrix.jsonl`` (``matrix``, read by ``shapes-render``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import HERE, RUNS, with_hand_written
from dpo_report import render, summarize
from dpo_setup import CKPT_OPTION, matmul_peak, model_sizes, preftune_options, prepare, shape_work_dir

_TOKEN_KEYS = ("pair_tokens", "trl_positions", "pt_tokens", "pt_positions", "scored")


def launch(spec: dict, work: Path, name: str) -> dict:
    """Runs one worker on ``spec`` (written to ``work/spec-<name>.json``); its result, with ``wall_s``."""
    spec_path = work / f"spec-{name}.json"
    spec["out"] = str(work / f"result-{name}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_CACHE=str(work / "hf-datasets"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "bench_dpo.py"), "worker", "--spec", str(spec_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
    result = json.loads(Path(spec["out"]).read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def run_spec(args: argparse.Namespace, plan: dict, workload: str, name: str, threads: int,
             options: dict[str, Any]) -> dict[str, Any]:
    """The worker spec of run ``name`` (``trainer:mode``) on ``workload``."""
    import torch

    wl = plan["workloads"][workload]
    return {
        "run": name, "model_dir": plan["model_dir"], "train_file": wl["train_file"],
        "ids_file": wl["ids_file"], "order": wl["order"], "batch_size": args.batch_size,
        "total_steps": plan["total_steps"], "n_pairs": plan["n_pairs"], "max_length": wl["max_length"],
        "seed": args.seed, "threads": threads, "cuda": torch.cuda.is_available(), "preftune_options": options,
    }


# ---- run: RESULTS.md --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    """Every selected run on every workload, ``--repeats`` times, then RESULTS.md (``--out``)."""
    started = time.perf_counter()
    print(f"[bench] preparing model and data in {Path(args.work_dir)}", flush=True)
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
            # A/B/A/B: alternate trainers; the second repeat runs the list backwards to cancel drift
            for name in runs if repeat % 2 == 0 else runs[::-1]:
                spec = run_spec(args, plan, workload, name, threads, preftune_options(args))
                result = launch(spec, work, f"{workload}-{name.replace(':', '-')}-{repeat}")
                result["matmul_peak"] = [peak, peak_cpu]  # kept with the run, for `render`
                Path(spec["out"]).write_text(json.dumps(result))
                summary = summarize(result, plan["workloads"][workload]["stats"], sizes, (peak, peak_cpu),
                                    args.warmup, args.batch_size, plan["n_pairs"])
                summary["repeat"] = repeat
                results[workload][name].append(summary)
                raw.append({"workload": workload, **summary})
                print(f"[bench] {workload:9s} {name:22s} rep {repeat}: e2e {summary['e2e_s']:7.1f}s "
                      f"{summary['pairs_per_s']:.3f} pairs/s, steady {summary['steady_step_s']:.2f} s/step, "
                      f"peak RSS {summary['peak_rss'] / 2**30:.2f} GiB, load {summary['loadavg']:.1f}",
                      flush=True)
    peaks = _peak_at_the_end(results, (peak, peak_cpu))
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    report = with_hand_written(out, render(args, plan, sizes, peaks, results, elapsed))
    out.write_text(report)
    stats = {w: plan["workloads"][w]["stats"] for w in args.workloads}
    (work / "results.json").write_text(json.dumps({"raw": raw, "plan_stats": stats}))
    print(report)
    print(f"[bench] wrote {args.out} ({elapsed / 60:.1f} min)")


def _peak_at_the_end(results: dict, peaks: tuple[float, float]) -> tuple[float, float]:
    """The machine may be shared: measures the peak again and keeps the better value, rescaling the MFUs
    of ``results`` to it; returns the peaks kept."""
    peak, peak_cpu = peaks
    peak_end, peak_cpu_end = matmul_peak()
    print(f"[bench] fp32 matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s "
          f"({peak_cpu_end / 1e9:.1f} CPU-time)", flush=True)
    for workload in results:
        for reps in results[workload].values():
            for r in reps:
                r["mfu_e2e"] *= peak / max(peak, peak_end)
                r["mfu_steady"] *= peak / max(peak, peak_end)
                r["mfu_steady_cpu"] *= peak_cpu / max(peak_cpu, peak_cpu_end)
    return max(peak, peak_end), max(peak_cpu, peak_cpu_end)


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
    best = (max(p[0] for p in peaks), max(p[1] for p in peaks))
    out = Path(args.out)
    report = with_hand_written(out, render(args, plan, sizes, best, results, None))
    out.write_text(report)
    print(report)


# ---- matrix: shapes x workloads x runs --------------------------------------------------------------------
def matrix(args: argparse.Namespace) -> None:
    """Shapes x workloads x runs (issue 15), one subprocess per run; appends one JSON line per run to
    ``<work-dir>/matrix.jsonl`` (``shapes-render`` turns them into tables). Runs are
    ``trainer:mode[@checkpointing]``; within a repeat they alternate in the order given (reversed on odd
    repeats)."""
    import torch

    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    peak = matmul_peak()
    print(f"[matrix] fp32 matmul peak {peak[0] / 1e9:.1f} GFLOP/s ({threads} threads)", flush=True)
    for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
        for shape in args.shapes or [args.shape]:
            args.shape = shape
            plan = prepare(args)
            for workload in args.workloads:
                for run_name in args.runs if repeat % 2 == 0 else args.runs[::-1]:
                    line = _matrix_run(args, plan, workload, run_name, repeat, threads, peak)
                    with open(root / "matrix.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(line) + "\n")
    end = matmul_peak()
    print(f"[matrix] fp32 matmul peak at the end {end[0] / 1e9:.1f} GFLOP/s", flush=True)


def _matrix_run(args: argparse.Namespace, plan: dict, workload: str, run_name: str, repeat: int,
                threads: int, peak: tuple[float, float]) -> dict[str, Any]:
    """One matrix run (``trainer:mode[@checkpointing]``): launched, summarised, printed; its JSON line."""
    name, _, ckpt = run_name.partition("@")
    options = preftune_options(args)
    if ckpt:
        options["gradient_checkpointing"] = CKPT_OPTION[ckpt]
    spec = run_spec(args, plan, workload, name, threads, options)
    tag = f"{workload}-{name.replace(':', '-')}{'-' + ckpt if ckpt else ''}-b{args.batch_size}-{repeat}"
    result = launch(spec, Path(plan["work_dir"]), tag)
    st = plan["workloads"][workload]["stats"]
    sizes = model_sizes(plan["model_dir"])
    summary = summarize(result, st, sizes, peak, args.warmup, args.batch_size, plan["n_pairs"])
    print(f"[matrix] {args.shape:6s} {workload:9s} {run_name:28s} rep {repeat}: steady "
          f"{summary['steady_step_s']:.2f} s/step (CPU {summary['steady_cpu_step_s'] / threads:.2f}), "
          f"e2e {summary['e2e_s']:.1f}s, peak RSS {summary['peak_rss'] / 2**30:.2f} GiB, "
          f"load {summary['loadavg']:.1f}", flush=True)
    return {
        **summary,
        "shape": args.shape, "workload": workload, "run": run_name,
        "checkpointing": ckpt or ("default" if name.startswith("preftune") else "trl default"),
        "repeat": repeat, "batch": args.batch_size, "max_length": spec["max_length"],
        "warmup": args.warmup, "steps": args.steps, "threads": threads, "matmul_peak": peak,
        "sizes": sizes, "tag": args.tag,
        "tokens_per_step": {k: sum(st[k]) / len(st[k]) for k in _TOKEN_KEYS},
        "lengths": st["lengths"],
    }
