"""DPO speed / memory benchmark: preftune vs TRL's DPOTrainer (issue 5). Run by hand, never in CI.

    pip install -e '.[bench]'          # trl + psutil, benchmark-only
    python benchmarks/bench_dpo.py                      # full run, writes benchmarks/RESULTS.md
    python benchmarks/bench_dpo.py --quick              # smoke check: 1 warm-up + 3 timed steps, 1 repeat
    python benchmarks/bench_dpo.py render               # RESULTS.md again from the saved per-run results
    python benchmarks/bench_dpo.py profile --workload hh  # torch.profiler of preftune's step

    # issue 15: model shapes x workloads (results appended to <work-dir>/matrix.jsonl), then the tables
    W=/tmp/preftune-shapes; B="python benchmarks/bench_dpo.py --threads 1 --work-dir $W"
    $B matrix --shapes head50,head20,head5 --workloads synthetic,hh,long \
        --runs preftune:default,trl:default,preftune:default@selective --warmup 1 --steps 4 --repeats 1
    $B profile --shape head20 --workload synthetic --reference default --pt-gradient-checkpointing selective \
        --profile-out $W/profiles.jsonl
    $B shapes-render            # writes $W/tables.md (every table of SHAPES.md's kind) and $W/scaling.png

Subcommands and their modules: ``run`` and ``render`` (RESULTS.md), ``matrix`` (``dpo_runs.py``,
``dpo_report.py``); ``worker`` (one run in its own process, ``dpo_worker.py``); ``profile``
(``dpo_profile.py``); ``shapes-render`` (``shapes_report.py``). Model, data and token statistics:
``dpo_setup.py``; shapes, workloads and runs: ``bench_common.py``.

Shapes (``SHAPES``): ``stock`` is the issue-5 model below; ``head50`` / ``head20`` / ``head5`` share one
decoder (4 x 512, ffn 1408: 12.85M matmul parameters) and differ in vocabulary (25088 / 6272 / 1280), which
puts the LM head at 50.0% / 20.0% / 4.9% of the matmul parameters; ``floor`` (12 x 768, ffn 2048, vocab
32000, 134M parameters) is for peak memory against weights + gradients + AdamW state. The non-stock shapes
use a byte-level BPE tokenizer with their vocabulary, trained on the HH-RLHF harmless-base test texts.
Workloads: ``hh``, ``synthetic`` (short: prompt 64, completions 64-192), ``long`` (prompt 150, completions
300-600, max_length >= 1024) and ``fixed<L>`` (prompt L/4, chosen and rejected 3L/4: every sequence L
tokens, for scaling; ``fixed<L>p<P>``: the prompt P% of L).
preftune's checkpointing: ``--pt-gradient-checkpointing on|full|off|selective`` or ``@full|@off|@selective``
after a matrix run name, passed to preftune's config as ``gradient_checkpointing``.

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
import os
import re
import tempfile

from bench_common import HERE, HH_FILE, SHAPES, SHARED, WORKLOADS

COMMANDS = ("run", "worker", "profile", "render", "matrix", "shapes-render")


def _split(s: str) -> list[str]:
    return s.split(",")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """What every subcommand reads: where, which data, which runs, how many steps."""
    parser.add_argument("command", nargs="?", default="run", choices=COMMANDS)
    parser.add_argument("--spec", help="(internal) worker spec file")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "preftune-bench"))
    parser.add_argument("--out", default=None,
                        help="run, render: the report (default benchmarks/RESULTS.md); "
                             "shapes-render: the tables (default <work-dir>/tables.md)")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    parser.add_argument("--hh-file", default=str(HH_FILE))
    parser.add_argument("--workloads", default="hh,synthetic", type=_split)
    parser.add_argument("--modes", default="model,default,precomputed", type=_split,
                        help="reference modes to run: model (2a), default (TRL default, 1), precomputed (2b)")
    parser.add_argument("--trainers", default="preftune,trl", type=_split)
    parser.add_argument("--skip", default=[], type=_split,
                        help="runs to leave out, e.g. preftune:precomputed when preftune's default "
                             "resolves to it (comparison 2b then uses the preftune:default run)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="A/B repeats (runs alternate within a repeat)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps, 1 repeat")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="stock", help=f"model shape: {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--numerics-steps", type=int, default=5)


def _add_matrix_args(parser: argparse.ArgumentParser) -> None:
    """matrix (issue 15): shapes x workloads x runs, one summary line per run in <work-dir>/matrix.jsonl;
    shapes-render: its tables."""
    parser.add_argument("--shapes", default=[], type=_split, help="matrix: shapes")
    parser.add_argument("--runs", default="preftune:default,trl:default", type=_split,
                        help="matrix: runs, trainer:mode[@checkpointing], e.g. preftune:default@selective")
    parser.add_argument("--tag", default="", help="matrix: a label stored with each result line")
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="matrix: number of the first repeat (a later invocation adding repeats; "
                             "odd = reversed order)")
    parser.add_argument("--plot", default=None,
                        help="shapes-render: the scaling figure (default: scaling.png beside --out)")


def _add_preftune_args(parser: argparse.ArgumentParser) -> None:
    """preftune's options; left out = preftune's own defaults (what "preftune default" means in a report)."""
    parser.add_argument("--layout", default=None, help="preftune layout")
    parser.add_argument("--pack-length", type=int, default=None, help="preftune pack_length (0 = none)")
    parser.add_argument("--logit-chunk-size", type=int, default=None, help="preftune logit_chunk_size")
    parser.add_argument("--pt-gradient-checkpointing", choices=("on", "off", "full", "selective"),
                        default=None, help="preftune gradient_checkpointing (on = full)")
    parser.add_argument("--pt-cpu-allocator", choices=("auto", "fast", "lean", "system"), default=None,
                        help="preftune cpu_allocator")


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="hh",
                        help="profile: one workload (hh, synthetic, long, fixed<L>)")
    parser.add_argument("--reference", default="model", help="profile: preftune reference mode")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-out",
                        help="profile: append the per-step category seconds (JSON line) here")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", help="profile: write a Chrome trace here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_add_run_args, _add_matrix_args, _add_preftune_args, _add_profile_args):
        add(parser)
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
    if args.out is None and args.command in ("run", "render"):
        args.out = str(HERE / "RESULTS.md")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "worker":
        from dpo_worker import worker

        worker(args.spec)
    elif args.command == "profile":
        from dpo_profile import profile

        profile(args)
    elif args.command == "shapes-render":
        from shapes_report import render

        render(args)
    else:
        import dpo_runs

        {"run": dpo_runs.run, "render": dpo_runs.render_saved, "matrix": dpo_runs.matrix}[args.command](args)


if __name__ == "__main__":
    main()
