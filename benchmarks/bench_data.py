"""Data-path scale benchmark (issue 25): time and peak memory to the FIRST optimizer step of preftune and of
TRL's DPOTrainer on large preference files. Run by hand, never in CI; one run at a time (each run is timed
and its memory measured alone).

    pip install -e '.[bench]'          # trl + psutil, benchmark-only
    # 1. preference files (under the work dir, never in the repository; a .meta.json is written beside each)
    python benchmarks/bench_data.py generate --pairs 10000 --out pairs-10k.jsonl
    python benchmarks/bench_data.py generate --pairs 1000000 --out pairs-1m.jsonl.gz
    # 2. one run each: a child process until its first optimizer step; one JSON line appended to
    #    benchmarks/data-scale/results.jsonl
    python benchmarks/bench_data.py run --file /tmp/preftune-data-bench/pairs-10k.jsonl --trainer trl --label 10k
    python benchmarks/bench_data.py run --file /tmp/preftune-data-bench/pairs-10k.jsonl --trainer preftune \\
        --label 10k --cache-dir /tmp/preftune-data-bench/cache-pt-10k --fresh-cache      # cold
    python benchmarks/bench_data.py run --file /tmp/preftune-data-bench/pairs-10k.jsonl --trainer preftune \\
        --label 10k --cache-dir /tmp/preftune-data-bench/cache-pt-10k                    # cached (same cache)
    # 3. benchmarks/DATA.md from results.jsonl (the "Analysis" section is kept when it is rewritten)
    python benchmarks/bench_data.py render

Data (``generate``): Anthropic HH-RLHF harmless-base test pairs (2,312 rows ``{"chosen", "rejected"}``, the
prompt implicit: split by ``preftune.data.formats.split_implicit_prompt``) recombined into ``N`` explicit
``{"prompt", "chosen", "rejected"}`` rows, as long as UltraFeedback's: pair ``i`` takes a random HH pair
(seeded RNG), puts before its dialogue the first human turn of another random HH dialogue with the pair
number in words, joined to its first turn (so no two prompts are equal and nothing deduplicates),
and extends its chosen and its rejected answer with further random HH assistant replies (paragraphs) up to
a random target of ``U[--min-chars, --max-chars]`` characters each. Deterministic for ``--seed``; written
row by row (gzip when the path ends in ``.gz``).

Runs (``run``): the same model and budgets for both trainers: preftune's embedded model
(``src/preftune/assets/stories260k``: Llama, vocabulary 512, 512 positions), max_length 512, max prompt
length 256 (TRL 1.x has no ``max_prompt_length``: it keeps the first ``max_length`` tokens of prompt +
completion; recorded as ``trl_max_prompt_length``), batch 8, fp32, CPU, one optimizer step.

* ``preftune``: ``python -m preftune dpo --model embedded --train_file FILE --max_steps 1 ...`` with
  ``XDG_CACHE_HOME`` = the cache dir (cold: a fresh empty dir; cached: the dir of an earlier run). Time to
  first step = wall time of the whole command (it stops after step 1); ``steps_line_s`` = when its start
  summary (the log line with ``steps:``) appeared.
* ``trl``: a child of this script loads the file with ``datasets.load_dataset("json", ...)`` (``cache_dir`` =
  the cache dir) and runs ``DPOTrainer`` (DPOConfig as in ``bench_dpo.py``'s ``_run_trl``: defaults except
  batch 8, max_length 512, fp32, ``use_cpu``, no eval, no saving, ``report_to="none"``; ``dataset_num_proc``
  left default); a callback stops training at the end of the first optimizer step. Time to first step = the
  moment that callback ran, from the child's start; ``wall_s`` = the whole child.

Memory: the child's process tree is polled every 0.2 s (``/proc/<pid>/status``: VmRSS and RssAnon, summed
over the tree); ``peak_rss_gib`` is the larger of that peak and ``getrusage(RUSAGE_CHILDREN).ru_maxrss``
(the largest single process; this script starts one child per invocation). ``peak_anon_gib`` leaves out
file-backed pages (memory-mapped Arrow files, shared libraries), which the kernel can reclaim. A child whose
anonymous memory passes ``--max-anon-gib`` (default 16) is killed, and recorded as such, so that a run cannot
take the whole machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
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

from bench_common import cpu_model, hh_rows, memory_gib, versions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("PREFTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
EMBEDDED = REPO / "src" / "preftune" / "assets" / "stories260k"
WORK_DIR = Path(tempfile.gettempdir()) / "preftune-data-bench"
RESULTS = HERE / "data-scale" / "results.jsonl"
REPORT = HERE / "DATA.md"
BUDGETS = {"max_length": 512, "max_prompt_length": 256, "batch_size": 8}
MARK = "BENCH-DATA "  # prefix of the TRL child's timing lines
ANALYSIS = "## Analysis"
ANALYSIS_PLACEHOLDER = ("_To be written by whoever changes the data path: what dominates the time and the memory "
                        "to the first step, at each size, for each trainer and mode._\n")


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """``1234567`` -> ``"one million two hundred thirty-four thousand five hundred sixty-seven"``."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + words(n % 100))
    for size, name in ((10**9, "billion"), (10**6, "million"), (10**3, "thousand")):
        if n >= size:
            return words(n // size) + " " + name + ("" if n % size == 0 else " " + words(n % size))
    raise AssertionError(n)


def _hh_parts(hh_file: Path) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """(explicit pairs, first human turns, assistant replies) of the HH file."""
    pairs, firsts, replies = [], [], []
    for row, pair in hh_rows(hh_file):
        if pair is not None:
            pairs.append(pair)
        first = row["chosen"].split("\n\nHuman:", 2)
        if len(first) > 1:
            firsts.append(first[1].split("\n\nAssistant:", 1)[0].strip())
        for text in (row["chosen"], row["rejected"]):
            for turn in text.split("\n\nAssistant:")[1:]:
                reply = turn.split("\n\nHuman:", 1)[0].strip()
                if len(reply) >= 40:  # a paragraph, not "Yes." or "Sure!"
                    replies.append(reply)
    replies = sorted(set(replies))  # the set removes the shared turns of chosen/rejected; sorted: deterministic
    return pairs, [f for f in firsts if f], replies


def generate(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else Path(f"pairs-{args.pairs}.jsonl")
    if not out.is_absolute() and out.parent == Path("."):
        out = Path(args.work_dir) / out
    out = out.resolve()
    if out.is_relative_to(REPO):
        raise SystemExit(f"{out}: generated files go outside the repository (e.g. under {args.work_dir})")
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs, firsts, replies = _hh_parts(Path(args.hh_file))
    rng = random.Random(args.seed)
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".part")
    totals = {"prompt": 0, "chosen": 0, "rejected": 0}

    def extend(text: str) -> str:
        target = rng.randint(args.min_chars, args.max_chars)
        parts = [text]
        n = len(text)
        while n < target:
            reply = rng.choice(replies)
            parts.append("\n\n" + reply)
            n += 2 + len(reply)
        return "".join(parts)

    opener = gzip.open if out.suffix == ".gz" else open
    kwargs = {"compresslevel": 6} if out.suffix == ".gz" else {}
    with opener(tmp, "wt", encoding="utf-8", newline="\n", **kwargs) as f:
        for i in range(args.pairs):
            p, c, r = pairs[rng.randrange(len(pairs))]
            head = "\n\nHuman:"  # HH prompts start with it: the other dialogue's question joins the first turn
            rest = p[len(head):].lstrip() if p.startswith(head) else p
            prompt = f"{head} {rng.choice(firsts)} (This is request number {words(i + 1)}.) {rest}"
            row = {"prompt": prompt, "chosen": extend(c), "rejected": extend(r)}
            for key, text in row.items():
                totals[key] += len(text)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if args.progress and (i + 1) % args.progress == 0:
                print(f"{i + 1} pairs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    tmp.replace(out)
    n = max(args.pairs, 1)
    meta = {
        "file": str(out), "pairs": args.pairs, "bytes": out.stat().st_size, "seed": args.seed,
        "source": str(args.hh_file), "min_chars": args.min_chars, "max_chars": args.max_chars,
        "mean_chars": {k: round(v / n, 1) for k, v in totals.items()},
        "mean_completion_chars": round((totals["chosen"] + totals["rejected"]) / (2 * n), 1),
        "generate_s": round(time.perf_counter() - start, 1),
        "command": _command("generate", ["--pairs", str(args.pairs), "--out", str(out), "--seed", str(args.seed),
                                         "--min-chars", str(args.min_chars), "--max-chars", str(args.max_chars)]),
    }
    if out.suffix == ".gz":
        meta["uncompressed_bytes"] = _gz_size(out)
    _meta_path(out).write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


def _gz_size(path: Path) -> int:
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += len(chunk)
    return n


def _meta_path(file: Path) -> Path:
    return file.with_name(file.name + ".meta.json")


def _command(sub: str, argv: list[str]) -> str:
    return shlex.join(["python", "benchmarks/bench_data.py", sub, *argv])


# ---------------------------------------------------------------------------------------------
# run: one trainer in a child process, timed and measured
# ---------------------------------------------------------------------------------------------
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
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)

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
            "peak_rss_gib": round(max(peak_rss, ru_maxrss) / 2**30, 3), "peak_anon_gib": round(peak_anon / 2**30, 3),
            "tail": list(lines)[-30:]}


def _file_info(path: Path) -> dict[str, Any]:
    meta_file = _meta_path(path)
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("bytes") == path.stat().st_size:
            return meta
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        pairs = sum(1 for _ in f)
    return {"file": str(path), "pairs": pairs, "bytes": path.stat().st_size}


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
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    b = BUDGETS
    if args.trainer == "preftune":
        env["XDG_CACHE_HOME"] = str(cache)
        cmd = [sys.executable, "-m", "preftune", "dpo", "--model", "embedded", "--train_file", str(path),
               "--max_steps", "1", "--output_dir", str(scratch / "out"), "--batch_size", str(b["batch_size"]),
               "--progress_bar", "false", "--max_length", str(b["max_length"]),
               "--max_prompt_length", str(b["max_prompt_length"]), "--precision", "fp32"]
        markers = {"steps_line_s": r"\bsteps:", "done_s": r"^done:"}
    else:
        env["HF_DATASETS_CACHE"] = str(cache)
        cmd = [sys.executable, str(Path(__file__).resolve()), "trl-worker", "--file", str(path),
               "--cache-dir", str(cache), "--scratch", str(scratch)]
        markers = {name + "_s": "^" + re.escape(MARK + name) + r"\b"
                   for name in ("imported", "loaded", "trainer_ready", "first_step_end")}
    print(f"{args.trainer} {'cold' if cold else 'cached'}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        m = measure(cmd, env, scratch, markers, args.max_anon_gib, args.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    ok = m["exit"] == 0 and not m["killed"]
    first = m["wall_s"] if args.trainer == "preftune" else m["markers_s"].get("first_step_end_s")
    if args.trainer == "preftune" and "done_s" not in m["markers_s"]:
        first = None  # it did not finish its step
    result: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "label": args.label, "trainer": args.trainer,
        "mode": "cold" if cold else "cached", "file": str(path), "pairs": info["pairs"], "file_bytes": info["bytes"],
        "uncompressed_bytes": info.get("uncompressed_bytes", info["bytes"]),
        "mean_completion_chars": info.get("mean_completion_chars"), "generate_command": info.get("command"),
        "ok": ok, "exit": m["exit"], "killed": m["killed"], "first_step_s": round(first, 2) if ok and first is not None else None,
        "wall_s": m["wall_s"], **{k: round(v, 2) for k, v in m["markers_s"].items()},
        "peak_rss_gib": m["peak_rss_gib"], "peak_anon_gib": m["peak_anon_gib"],
        "polled_peak_rss_gib": round(m["polled_peak_rss"] / 2**30, 3), "ru_maxrss_gib": round(m["ru_maxrss"] / 2**30, 3),
        "prep_pairs_per_s": round(info["pairs"] / first, 1) if ok and first else None,
        "budgets": BUDGETS, "cache_dir": str(cache) if args.cache_dir else None,
        "command": shlex.join(["python", "benchmarks/bench_data.py", *sys.argv[1:]]), "child_command": shlex.join(cmd),
        "machine": machine(), "versions": versions(), "source": source_state(),
    }
    if args.trainer == "trl":
        result["trl_max_prompt_length"] = _trl_has_max_prompt_length()
    if not ok:
        result["tail"] = m["tail"]
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    shown = {k: result[k] for k in ("label", "trainer", "mode", "pairs", "ok", "first_step_s", "wall_s",
                                    "peak_rss_gib", "peak_anon_gib", "prep_pairs_per_s")}
    print(json.dumps(shown))
    if not ok:
        print("\n".join(m["tail"]), file=sys.stderr)
        raise SystemExit(f"{args.trainer} run failed: exit {m['exit']}{', ' + m['killed'] if m['killed'] else ''}")


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
        output_dir=str(Path(args.scratch) / "out"), per_device_train_batch_size=BUDGETS["batch_size"], max_steps=1,
        learning_rate=1e-6, beta=0.1, max_length=BUDGETS["max_length"], bf16=False, fp16=False, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
        dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        **options,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED))
    trainer = DPOTrainer(model=str(EMBEDDED), args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[FirstStep()])
    mark("trainer_ready")
    trainer.train()
    mark("done")


# ---------------------------------------------------------------------------------------------
# machine, versions, source
# ---------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "os": platform.platform()}


def source_state() -> dict[str, Any]:
    """The commit of the checkout and whether src/ had uncommitted changes (the data path is being rewritten)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "src_dirty": bool(git("status", "--porcelain", "--", "src"))}


# ---------------------------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------------------------
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
    lines = [
        "# Data path at scale: time and memory to the first optimizer step (issue 25)",
        "",
        "Written by `python benchmarks/bench_data.py render` from `benchmarks/data-scale/results.jsonl` "
        "(one line per run; the section \"Analysis\" is kept when this file is rewritten). How the data are "
        "built and what is measured: the docstring of `benchmarks/bench_data.py`.",
        "",
        f"Both trainers: preftune's embedded model (stories260K, vocabulary 512), max_length "
        f"{BUDGETS['max_length']}, max prompt length {BUDGETS['max_prompt_length']} (TRL 1.x has no "
        f"`max_prompt_length`: it truncates prompt + completion to max_length), batch {BUDGETS['batch_size']}, "
        "fp32, CPU, stopped after the first optimizer step. **s to step 1**: preftune: wall time of the whole "
        "`preftune dpo --max_steps 1` command; TRL: from the child's start to the end of its first optimizer "
        "step. **peak RSS**: the child process tree (polled every 0.2 s, and getrusage's ru_maxrss); **anon**: "
        "the part of it that is not file-backed (memory-mapped Arrow files and libraries are file-backed). "
        "**pairs/s**: pairs / s to step 1 (preparation throughput, model loading and the step included). "
        "**cold**: an empty cache dir (preftune: `XDG_CACHE_HOME`; TRL: the `datasets` cache); **cached**: the "
        "cache of an earlier run on the same file.",
        "",
    ]
    sizes = sorted({(r["pairs"], r["file_bytes"]) for r in results})
    for pairs, size in sizes:
        rows = [r for r in results if (r["pairs"], r["file_bytes"]) == (pairs, size)]
        raw = rows[0].get("uncompressed_bytes", size)
        gz = f" (gzip; {raw / 1e6:,.0f} MB uncompressed)" if raw != size else ""
        chars = rows[0].get("mean_completion_chars")
        lines += [f"## {pairs:,} pairs: {size / 1e6:,.0f} MB{gz}" + (f", {chars:,.0f} characters per completion"
                                                                    if chars else ""), ""]
        lines += ["| pairs | file MB | trainer | mode | label | s to step 1 | peak RSS GiB | anon GiB | pairs/s "
                  "| result | CPU, cores | versions (torch / transformers / datasets / trl) | when |",
                  "|---:|---:|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
        for r in rows:
            v, mc = r["versions"], r["machine"]
            result = "ok" if r["ok"] else (f"killed: {r['killed']}" if r["killed"] else f"exit {r['exit']}")
            src = r.get("source", {})
            when = r["time"][:16].replace("T", " ") + (f" ({src.get('commit')}{', src modified' if src.get('src_dirty') else ''})"
                                                      if src else "")
            lines.append(
                f"| {pairs:,} | {size / 1e6:,.0f} | {r['trainer']} | {r['mode']} | {r['label']} "
                f"| {_fmt(r['first_step_s'], '.1f')} | {_fmt(r['peak_rss_gib'], '.2f')} "
                f"| {_fmt(r.get('peak_anon_gib'), '.2f')} | {_fmt(r['prep_pairs_per_s'], ',.0f')} | {result} "
                f"| {mc['cpu']}, {mc['cores']} | {v['torch']} / {v['transformers']} / {v['datasets']} / {v['trl']} "
                f"| {when} |")
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
    lines += ["## Reproduce", "", "```bash", "pip install -e '.[bench]'   # trl, psutil"]
    for cmd in dict.fromkeys(r["generate_command"] for r in results if r.get("generate_command")):
        lines.append(cmd)
    for cmd in dict.fromkeys(r["command"] for r in results):
        lines.append(cmd)
    lines += ["python benchmarks/bench_data.py render", "```", "", analysis]
    out.write_text("\n".join(lines))
    print(f"wrote {out} ({len(results)} runs)")


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(WORK_DIR), help="generated files, caches, scratch (not the repo)")
    parser.add_argument("--results", default=str(RESULTS), help="run: appends here; render: reads it")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="build a preference file of N pairs from the HH pairs")
    g.add_argument("--pairs", type=int, required=True)
    g.add_argument("--out", help="path (.jsonl or .jsonl.gz); a bare name goes under --work-dir")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--hh-file", default=str(HH_FILE))
    g.add_argument("--min-chars", type=int, default=600, help="completion target length, lower end")
    g.add_argument("--max-chars", type=int, default=2000, help="completion target length, upper end")
    g.add_argument("--progress", type=int, default=100_000, help="log every N pairs (0: never)")
    r = sub.add_parser("run", help="one trainer until its first optimizer step; appends to data-scale/results.jsonl")
    r.add_argument("--file", required=True)
    r.add_argument("--trainer", choices=("preftune", "trl"), required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--cache-dir", help="preftune: XDG_CACHE_HOME; trl: the datasets cache (default: a fresh "
                                       "temporary dir, removed after the run)")
    r.add_argument("--fresh-cache", action="store_true", help="empty --cache-dir first (a cold run)")
    r.add_argument("--max-anon-gib", type=float, default=16.0, help="kill the run past this much anonymous memory")
    r.add_argument("--timeout", type=float, default=None, help="kill the run after this many seconds")
    w = sub.add_parser("trl-worker", help="(internal) the TRL arm's child process")
    w.add_argument("--file", required=True)
    w.add_argument("--cache-dir", required=True)
    w.add_argument("--scratch", required=True)
    d = sub.add_parser("render", help="write benchmarks/DATA.md from data-scale/results.jsonl")
    d.add_argument("--out", default=str(REPORT))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"generate": generate, "run": run, "trl-worker": trl_worker, "render": render}[args.command](args)


if __name__ == "__main__":
    main()
