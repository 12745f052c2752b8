"""``bench_data.py render``: DATA.md from ``data-scale/results.jsonl`` (one table per file size, the TRL
stages, the commands that reproduce the runs); the section "Analysis" of an existing DATA.md is kept."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench_common import HERE
from data_run import BUDGETS

REPORT = HERE / "DATA.md"
ANALYSIS = "## Analysis"
ANALYSIS_PLACEHOLDER = ("_To be written by whoever changes the data path: what dominates the time and the "
                        "memory to the first step, at each size, for each trainer and mode._\n")


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def render(args: argparse.Namespace) -> None:
    results = []
    if Path(args.results).exists():
        with open(args.results, encoding="utf-8") as f:
            results = [json.loads(line) for line in f if line.strip()]
    out = Path(args.out)
    analysis = f"{ANALYSIS}\n\n{ANALYSIS_PLACEHOLDER}"
    if out.exists():
        old = out.read_text()
        if ANALYSIS in old:
            analysis = old[old.index(ANALYSIS):].rstrip() + "\n"
    lines = _intro()
    for pairs, size in sorted({(r["pairs"], r["file_bytes"]) for r in results}):
        lines += _size_section([r for r in results if (r["pairs"], r["file_bytes"]) == (pairs, size)])
    lines += ["## Reproduce", "", "```bash", "pip install -e '.[bench]'   # trl, psutil"]
    for cmd in dict.fromkeys(r["generate_command"] for r in results if r.get("generate_command")):
        lines.append(cmd)
    for cmd in dict.fromkeys(r["command"] for r in results):
        lines.append(cmd)
    lines += ["python benchmarks/bench_data.py render", "```", "", analysis]
    out.write_text("\n".join(lines))
    print(f"wrote {out} ({len(results)} runs)")


def _intro() -> list[str]:
    return [
        "# Data path at scale: time and memory to the first optimizer step (issue 25)",
        "",
        "Written by `python benchmarks/bench_data.py render` from `benchmarks/data-scale/results.jsonl` "
        "(one line per run; the section \"Analysis\" is kept when this file is rewritten). How the data are "
        "built and what is measured: the docstring of `benchmarks/bench_data.py`.",
        "",
        f"Both trainers: preftune's embedded model (stories260K, vocabulary 512), max_length "
        f"{BUDGETS['max_length']}, max prompt length {BUDGETS['max_prompt_length']} (TRL 1.x has no "
        f"`max_prompt_length`: it truncates prompt + completion to max_length), batch "
        f"{BUDGETS['batch_size']}, fp32, CPU, stopped after the first optimizer step. **s to step 1**: "
        "preftune: wall time of the whole `preftune dpo --max_steps 1` command; TRL: from the child's start "
        "to the end of its first optimizer step. **peak RSS**: the child process tree (polled every 0.2 s, "
        "and getrusage's ru_maxrss); **anon**: the part of it that is not file-backed (memory-mapped Arrow "
        "files and libraries are file-backed). **pairs/s**: pairs / s to step 1 (preparation throughput, "
        "model loading and the step included). **cold**: an empty cache dir (preftune: `XDG_CACHE_HOME`; "
        "TRL: the `datasets` cache); **cached**: the cache of an earlier run on the same file.",
        "",
    ]


def _size_section(rows: list[dict[str, Any]]) -> list[str]:
    """The runs on one file: its heading, one table row a run, the TRL stages and preftune's start line."""
    pairs, size = rows[0]["pairs"], rows[0]["file_bytes"]
    raw = rows[0].get("uncompressed_bytes", size)
    gz = f" (gzip; {raw / 1e6:,.0f} MB uncompressed)" if raw != size else ""
    chars = rows[0].get("mean_completion_chars")
    lines = [f"## {pairs:,} pairs: {size / 1e6:,.0f} MB{gz}"
             + (f", {chars:,.0f} characters per completion" if chars else ""), ""]
    lines += ["| pairs | file MB | trainer | mode | label | s to step 1 | peak RSS GiB | anon GiB | pairs/s "
              "| result | CPU, cores | versions (torch / transformers / datasets / trl) | when |",
              "|---:|---:|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        v, mc = r["versions"], r["machine"]
        result = "ok" if r["ok"] else (f"killed: {r['killed']}" if r["killed"] else f"exit {r['exit']}")
        src = r.get("source", {})
        dirty = ", src modified" if src.get("src_dirty") else ""
        when = r["time"][:16].replace("T", " ") + (f" ({src.get('commit')}{dirty})" if src else "")
        lines.append(
            f"| {pairs:,} | {size / 1e6:,.0f} | {r['trainer']} | {r['mode']} | {r['label']} "
            f"| {_fmt(r['first_step_s'], '.1f')} | {_fmt(r['peak_rss_gib'], '.2f')} "
            f"| {_fmt(r.get('peak_anon_gib'), '.2f')} | {_fmt(r['prep_pairs_per_s'], ',.0f')} | {result} "
            f"| {mc['cpu']}, {mc['cores']} | {v['torch']} / {v['transformers']} / {v['datasets']} / "
            f"{v['trl']} | {when} |")
    lines.append("")
    stages = [r for r in rows if r["trainer"] == "trl" and r.get("loaded_s") is not None]
    if stages:
        lines += ["TRL stages (s from the child's start): " + "; ".join(
            f"{r['label']} {r['mode']}: imports {r.get('imported_s', 0):.1f}, dataset loaded "
            f"{r['loaded_s']:.1f}, DPOTrainer built (tokenized) {_fmt(r.get('trainer_ready_s'), '.1f')}, "
            f"step 1 ended {_fmt(r.get('first_step_s'), '.1f')}" for r in stages), ""]
    pt = [r for r in rows if r["trainer"] == "preftune" and r.get("steps_line_s") is not None]
    if pt:
        lines += ["preftune: the start summary (`steps:` line) appeared at " + "; ".join(
            f"{r['label']} {r['mode']}: {r['steps_line_s']:.1f} s" for r in pt), ""]
    return lines
