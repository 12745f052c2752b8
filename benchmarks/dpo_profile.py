"""``bench_dpo.py profile``: torch.profiler over a few of preftune's steps. Nothing in preftune is patched:
the phases are the ``torch.profiler.record_function`` labels preftune puts on its own steps (``PHASES``),
and the self time of every op is put in a category by its name and input shapes (``categories``)."""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dpo_setup import model_sizes, preftune_config, preftune_options, prepare

#: preftune's own profiler labels, and where it sets them
PHASES = {
    "preftune: forward+backward": "each micro-batch's forward and backward (engine/loop.py)",
    "preftune: decoder": "the decoder's forward, policy and reference (model/logps.py SequenceScorer)",
    "preftune: output layer": "the output layer's log-probs, forward (model/logps.py SequenceScorer)",
    "preftune: reference": "the reference's log-probs inside a step (methods/dpo.py)",
    "preftune: optimizer step": "optimizer.step() (engine/loop.py)",
}
UNLABELLED = ("not reported apart (preftune does not label them; their ops count in the phases and "
              "categories around them): the recomputation of checkpointed layers in backward "
              "(gradient_checkpointing full or selective) and the collation of batches")
#: matrix products; the last: fp32 linear layers through oneDNN (``cpu_linear: onednn``, x86 CPUs)
_MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
            "aten::linear", "mkldnn::_linear_pointwise")
CATEGORIES = ("LM head: matmuls with the vocab dimension", "LM head: elementwise on [*, vocab] tensors",
              "decoder matmuls (mm/addmm/bmm), forward + backward",
              "attention (scaled_dot_product kernels, fwd + bwd)", "optimizer step (AdamW)",
              "other ops (norms, rotary, SiLU, residuals, copies, autograd bookkeeping)")


def profile(args: argparse.Namespace) -> None:
    """``--profile-steps`` steps profiled after one waited and one warm-up step; prints the top ops, the
    phases, the top ops by input shape and the self time by category; ``--profile-out`` appends the
    categories per step as a JSON line, ``--trace`` writes a Chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity, schedule

    from preftune.methods.dpo import train_dpo

    args.workloads = [args.workload]
    args.warmup, args.steps = 1, args.profile_steps + 1
    plan = prepare(args)
    wl = plan["workloads"][args.workload]
    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                  schedule=schedule(wait=1, warmup=1, active=args.profile_steps, repeat=1))
    tmp = Path(tempfile.mkdtemp(prefix="bench-prof-"))
    config = preftune_config(model_dir=plan["model_dir"], train_file=wl["train_file"],
                             batch_size=args.batch_size, total_steps=plan["total_steps"],
                             max_length=wl["max_length"], seed=args.seed, reference=args.reference, tmp=tmp,
                             options=preftune_options(args))
    times: list[float] = []
    try:
        with prof:
            train_dpo(config, callbacks=[lambda step, row: (times.append(time.perf_counter()), prof.step())])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps = [b - a for a, b in zip(times, times[1:])]
    print(f"step times: {', '.join(f'{s:.2f}' for s in steps)} s")
    _print_tables(args, prof)
    cats = categories(prof, model_sizes(plan["model_dir"])["vocab"])
    print(f"self time by category, per step ({args.profile_steps} steps profiled):")
    for name, seconds in cats.items():
        print(f"  {name:60s} {seconds / args.profile_steps:7.2f} s")
    if args.profile_out:
        with open(args.profile_out, "a", encoding="utf-8") as f:
            f.write(json.dumps(_profile_line(args, steps, cats)) + "\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)


def _print_tables(args: argparse.Namespace, prof: Any) -> None:
    """The top ops by self time, preftune's phases (inclusive time), the top ops by input shape."""
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print("phases labelled by preftune (inclusive CPU time, all profiled steps):")
    for e in sorted((e for e in avg if e.key in PHASES), key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:30s} {e.cpu_time_total / 1e6:8.2f} s  x{e.count:<4d} {PHASES[e.key]}")
    print(f"  {UNLABELLED}")
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.rows))


def _profile_line(args: argparse.Namespace, steps: list[float], cats: dict[str, float]) -> dict[str, Any]:
    """The JSON line of ``--profile-out`` (what ``shapes-render`` tabulates)."""
    import torch

    return {"shape": args.shape, "workload": args.workload,
            "checkpointing": args.pt_gradient_checkpointing or "default", "reference": args.reference,
            "batch": args.batch_size, "threads": torch.get_num_threads(),
            "profiled_steps": args.profile_steps,
            "step_s": steps[-args.profile_steps:],  # the profiled (active) steps' wall times
            "categories_per_step": {k: v / args.profile_steps for k, v in cats.items()},
            "loadavg": os.getloadavg()[0]}


def categories(prof: Any, vocab: int) -> dict[str, float]:
    """Self CPU seconds of the profiled steps by kind of work (``CATEGORIES``): ops inside preftune's
    ``optimizer step`` label count there; elsewhere matmuls and elementwise ops with a ``vocab``-sized input
    dimension are the LM head's. A checkpointed layer's recompute is not labelled: its ops count as the
    decoder's, attention or other ops."""
    events = prof.events()
    optimizer = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.name == "preftune: optimizer step")
    head_mm, head_elementwise, decoder_mm, attention, optimizer_step, other = CATEGORIES
    out = {k: 0.0 for k in CATEGORIES}
    for e in events:
        if e.name.startswith("preftune: ") or e.name.startswith("ProfilerStep"):
            continue
        t = e.self_cpu_time_total / 1e6
        with_vocab = any(vocab in s for s in (e.input_shapes or []) if s)
        if _inside(e.time_range.start, optimizer):
            out[optimizer_step] += t
        elif e.name in _MATMULS:
            out[head_mm if with_vocab else decoder_mm] += t
        elif "scaled_dot_product" in e.name or "flash_attention" in e.name:
            out[attention] += t
        elif with_vocab:
            out[head_elementwise] += t
        else:
            out[other] += t
    return out


def _inside(start: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``start`` falls in one of the sorted, non-overlapping ``ranges``."""
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= start <= ranges[i][1]
