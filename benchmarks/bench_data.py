"""Data-path scale benchmark (issue 25): time and peak memory to the FIRST optimizer step of preftune and of
TRL's DPOTrainer on large preference files. Run by hand, never in CI; one run at a time (each run is timed
and its memory measured alone).

    pip install -e '.[bench]'          # trl + psutil, benchmark-only
    # 1. preference files (under the work dir, never in the repository; a .meta.json is written beside each)
    python benchmarks/bench_data.py generate --pairs 10000 --out pairs-10k.jsonl
    python benchmarks/bench_data.py generate --pairs 1000000 --out pairs-1m.jsonl.gz
    # 2. one run each: a child process until its first optimizer step; one JSON line appended to
    #    benchmarks/data-scale/results.jsonl
    python benchmarks/bench_data.py run --file /tmp/preftune-data-bench/pairs-10k.jsonl --trainer trl \\
        --label 10k
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
  the cache dir) and runs ``DPOTrainer`` (DPOConfig as in ``dpo_worker.py``'s ``_trl_config``: defaults except
  batch 8, max_length 512, fp32, ``use_cpu``, no eval, no saving, ``report_to="none"``; ``dataset_num_proc``
  left default); a callback stops training at the end of the first optimizer step. Time to first step = the
  moment that callback ran, from the child's start; ``wall_s`` = the whole child.

Memory: the child's process tree is polled every 0.2 s (``/proc/<pid>/status``: VmRSS and RssAnon, summed
over the tree); ``peak_rss_gib`` is the larger of that peak and ``getrusage(RUSAGE_CHILDREN).ru_maxrss``
(the largest single process; this script starts one child per invocation). ``peak_anon_gib`` leaves out
file-backed pages (memory-mapped Arrow files, shared libraries), which the kernel can reclaim. A child whose
anonymous memory passes ``--max-anon-gib`` (default 16) is killed, and recorded as such, so that a run cannot
take the whole machine.

Modules: ``data_generate.py`` (``generate``), ``data_run.py`` (``run``, ``trl-worker``), ``data_report.py``
(``render``).
"""

from __future__ import annotations

import argparse

from bench_common import HH_FILE
from data_generate import generate
from data_report import REPORT, render
from data_run import RESULTS, WORK_DIR, run, trl_worker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(WORK_DIR),
                        help="generated files, caches, scratch (not the repo)")
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
    r = sub.add_parser("run", help="one trainer until its first optimizer step; appends to "
                                   "data-scale/results.jsonl")
    r.add_argument("--file", required=True)
    r.add_argument("--trainer", choices=("preftune", "trl"), required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--cache-dir", help="preftune: XDG_CACHE_HOME; trl: the datasets cache (default: a fresh "
                                       "temporary dir, removed after the run)")
    r.add_argument("--fresh-cache", action="store_true", help="empty --cache-dir first (a cold run)")
    r.add_argument("--max-anon-gib", type=float, default=16.0,
                   help="kill the run past this much anonymous memory")
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
