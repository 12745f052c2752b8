"""Tables of the result lines of ``bench_dpo.py matrix`` and ``bench_dpo.py profile --profile-out``
(issue 15), for SHAPES.md. Called as ``python benchmarks/bench_dpo.py --work-dir DIR shapes-render
[--out FILE] [--plot PNG]``: reads ``DIR/matrix.jsonl`` (and ``matrix-before-unpadded.jsonl``,
``profiles.jsonl`` there), writes ``FILE`` (default ``DIR/tables.md``; a hand-written part below
``bench_common.KEEP_MARKER`` is kept) and, when ``fixed<L>`` workloads were run, the scaling figure
(default ``scaling.png`` beside ``FILE``)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench_common import (
    COMPARISONS,
    SHAPES,
    machine_text,
    median,
    param_counts,
    versions_line,
    with_hand_written,
)
from shapes_scaling import scaling_section

GiB = 2**30
Groups = dict[tuple, list[dict]]
#: profile categories (``dpo_profile.CATEGORIES``, and older names) -> column headers
_PROFILE_COLUMNS = {
    "LM head: matmuls with the vocab dimension": "head matmuls",
    "LM head: elementwise on [*, vocab] tensors": "head elementwise",
    "decoder matmuls (mm/addmm/bmm), forward + backward": "decoder matmuls",
    "attention (scaled_dot_product kernels, fwd + bwd)": "attention",
    "recompute: decoder matmuls (checkpoint replay)": "recompute: matmuls",
    "recompute: attention (checkpoint replay)": "recompute: attention",
    "recompute: other ops (checkpoint replay)": "recompute: other",
    "optimizer step (AdamW foreach)": "optimizer",
    "optimizer step (AdamW)": "optimizer",
    "other ops (norms, rotary, SiLU, residuals, copies, autograd bookkeeping)":
        "other (norms, RoPE, SiLU, ...)",
}


def shape_sizes(shape: str) -> dict[str, float]:
    """Layers, widths and parameter counts of a shape; ``share`` = the LM head's share of matmul params."""
    c = param_counts(SHAPES[shape]["config"])
    return {**c, "share": c["head"] / (c["decoder"] + c["head"]),
            "total": c["decoder"] + c["head"] + c["embedding"] + c["norms"]}


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:  # lines written before the run name was kept: rebuild it from the checkpointing mode
        if r.get("checkpointing") in ("full", "selective", "off") and "@" not in r.get("run", "@"):
            r["run"] += "@" + r["checkpointing"]
    return rows


def grouped(rows: list[dict]) -> Groups:
    out: Groups = defaultdict(list)
    for r in rows:
        out[(r["shape"], r["workload"], r["batch"], r["run"])].append(r)
    return out


def med(reps: list[dict], key: str) -> float:
    return median([r[key] for r in reps])


def cpu_step(reps: list[dict]) -> float:
    return median([r["steady_cpu_step_s"] / r["threads"] for r in reps])


def ratio(pt: list[dict], trl: list[dict], key: str) -> float:
    """Median over repeats of preftune's ``key`` over TRL's."""
    return median([a[key] / b[key] for a, b in zip(pt, trl)])


def loss_rel(a: dict, b: dict) -> float:
    pairs = [(x.get("loss"), y.get("loss")) for x, y in zip(a["metrics"], b["metrics"])]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    return max((abs(x - y) / max(abs(x), abs(y)) for x, y in pairs), default=float("nan"))


def margin_scale(a: dict, b: dict) -> float:
    """max |margin difference| / (beta * max |summed logps|): the fp32 resolution margins are compared at."""
    diffs = [abs(x["rewards/margins"] - y["rewards/margins"]) for x, y in zip(a["metrics"], b["metrics"])
             if "rewards/margins" in x and "rewards/margins" in y]
    scale = [0.1 * max(abs(x.get("logps/chosen", 0.0)), abs(x.get("logps/rejected", 0.0)))
             for x in a["metrics"]]
    return max(diffs, default=float("nan")) / max(max(scale, default=0.0), 1e-30)


def work_ratio(row: dict) -> float:
    """TRL default's model FLOPs per step over preftune's necessary ones, i.e. the speed-up preftune
    would have at the same FLOP/s as TRL. TRL: policy forward, checkpoint recompute, backward and
    reference forward (2 + 2 + 4 + 2) over every padded position, its output layer at every position
    (2 + 4 + 2); preftune: policy forward + backward and one reference forward (2 + 4 + 2) over the
    unique real tokens, the output layer at the scored ones."""
    t, n, hv = row["tokens_per_step"], row["sizes"]["non_embedding"], row["sizes"]["head"]
    trl = 10 * n * t["trl_positions"] + 8 * hv * t["trl_positions"]
    return trl / (8 * n * t["pt_tokens"] + 8 * hv * t["scored"])


def mfu_run_cpu(row: dict) -> float:
    """MFU over the whole run in CPU time: every step plus the reference pass (one forward per pair)
    and start-up (imports, model load, tokenization), from the stored wall-time ``mfu_e2e``."""
    wall_peak, cpu_peak = row["matmul_peak"]
    return row["mfu_e2e"] * row["e2e_s"] / (row["cpu_s"] / row["threads"]) * wall_peak / cpu_peak


def _ids(trl: list[dict]) -> str:
    return "same" if not any(t.get("token_mismatches") for t in trl) else "DIFFER"


def _load(*groups: list[dict]) -> str:
    return f"{max(r['loadavg'] for g in groups for r in g):.1f}"


# ---- the report ---------------------------------------------------------------------------------------
def render(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    every = load(work / "matrix.jsonl")
    # the longer runs (tags ending in "epoch", one per pass) get their own table
    rows = [r for r in every if not r.get("tag", "").endswith("epoch")]
    longer = [r for r in every if r.get("tag", "").endswith("epoch")]
    out = Path(args.out) if args.out else work / "tables.md"
    plot = Path(args.plot) if getattr(args, "plot", None) else out.parent / "scaling.png"
    groups = grouped(rows)
    lines = _header(rows) + _shapes_table(rows)
    lines += _default_table(groups, grouped(load(work / "matrix-before-unpadded.jsonl")))
    lines += _checkpointing_table(groups) + _longer_table(longer) + _like_table(groups)
    lines += _floor_table(rows) + _profile_table(load(work / "profiles.jsonl"))
    lines += scaling_section(rows, plot, out)
    lines.append("")
    report = with_hand_written(out, "\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"wrote {out}")


def _header(rows: list[dict]) -> list[str]:
    peaks = [r["matmul_peak"][0] for r in rows]
    peak_range = f"{min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} GFLOP/s" if peaks else "n/a"
    return [
        "# Speed and memory across model shapes, preftune vs TRL (issue 15): every table",
        "",
        "Generated by `python benchmarks/bench_dpo.py shapes-render` from the runs of `bench_dpo.py matrix` "
        "and `bench_dpo.py profile --profile-out` (commands in SHAPES.md). Run by hand, never in CI.",
        "",
        f"Rendered on {machine_text()}; the result lines do not record the machine they ran on. One torch "
        "thread per run, one run at a time. fp32 matmul peak (1 thread, measured at the start of each matrix "
        f"invocation): {peak_range}.",
        "",
        versions_line() + " (rendering; not necessarily the runs')",
        "",
        "**Read the CPU-time columns.** With the machine shared, wall time depends on what else ran; CPU "
        "time (user + system of the worker / threads) is what the run costs with its core to itself. It "
        "still includes slow-down from cache and memory-bandwidth sharing, so differences under ~15% between "
        "separate runs are within noise.",
        "",
    ]


def _shapes_table(rows: list[dict]) -> list[str]:
    lines = ["## Shapes", "",
             "One decoder for the three head shares, so the vocabulary (LM head) is the only thing that "
             "changes. Tokenizers: byte-level BPE trained on the HH-RLHF harmless-base test texts with the "
             "shape's vocabulary (`<|endoftext|>` = BOS = EOS, no pad token, like GPT-2's), both trainers "
             "use it.", "",
             "| shape | layers x hidden (ffn, heads) | vocab | decoder matmul params | LM head params | "
             "head share of matmul params | all params |", "|---|---|---:|---:|---:|---:|---:|"]
    for shape in sorted({r["shape"] for r in rows}, key=list(SHAPES).index):
        z = shape_sizes(shape)
        lines.append(f"| `{shape}` | {z['layers']} x {z['hidden']} ({z['ffn']}, {z['heads']}) | "
                     f"{z['vocab']} | {z['decoder'] / 1e6:.2f}M | {z['head'] / 1e6:.2f}M | "
                     f"**{100 * z['share']:.1f}%** | {z['total'] / 1e6:.1f}M |")
    return lines


_DEFAULT_INTRO = (
    "Both trainers with their defaults (preftune: `prefix_shared` layout run unpadded (one row of real "
    "tokens, attention per pair), reference precomputed in the run (the run covers its data), "
    "`gradient_checkpointing: auto` (-> `off` on these shapes: the activations fit), chunked LM head; TRL: "
    "separate reference model, gradient checkpointing on), fp32, AdamW lr 1e-6, beta 0.1. e2e = model load "
    "+ tokenization + reference (pre)computation + all steps; steady = the timed steps. Ratios are preftune "
    "/ TRL in pairs/s (higher = preftune faster) and in peak RSS (lower = preftune smaller). 'before' = the "
    "same ratio measured with the previous default (dense `[R, 1, T, T]` mask over padded rows, full "
    "checkpointing; `matrix-before-unpadded.jsonl`). 'work ratio' = TRL's model FLOPs per step (recompute "
    "and padding included) over preftune's necessary FLOPs: the speed-up at equal FLOP/s, so a ratio above "
    "it needs preftune to run its FLOPs faster than TRL does (`shapes_report.work_ratio`).")
_DEFAULT_COLUMNS = (
    "| shape | workload | batch x (warm-up + timed) steps, repeats | tokens/step TRL (padded positions) / "
    "preftune (dense-layout positions) | preftune CPU s/step | TRL CPU s/step | **CPU e2e ratio** | before | "
    "work ratio (ceiling) | CPU steady ratio | wall e2e ratio | wall steady ratio | "
    "peak RSS preftune / TRL GiB | RSS ratio | MFU steady CPU-time preftune / TRL | "
    "MFU whole run (CPU) preftune / TRL | loss max rel diff | margin diff / (beta max abs logps) | "
    "token ids | load |")


def _default_rows(groups: Groups, need_trl: bool = True) -> list[tuple[tuple, list[dict], list[dict]]]:
    """(key, preftune default runs, TRL default runs) of the 8-pair, non-``fixed`` workloads (with
    ``need_trl``, only those TRL ran too)."""
    out = []
    for key, reps in groups.items():
        shape, workload, batch, run = key
        trl = groups.get((shape, workload, batch, "trl:default")) or []
        wanted = run == "preftune:default" and not workload.startswith("fixed") and batch == 8
        if wanted and (trl or not need_trl):
            out.append((key, reps, trl))
    return out


def _default_table(groups: Groups, before: Groups) -> list[str]:
    lines = ["", "## preftune default vs TRL default", "", _DEFAULT_INTRO, "", _DEFAULT_COLUMNS,
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|---|---:|"]
    for (shape, workload, batch, _), pt, trl in _default_rows(groups):
        old = [a["cpu_pairs_per_s"] / b["cpu_pairs_per_s"] for a, b in zip(
            before.get((shape, workload, batch, "preftune:default"), []),
            before.get((shape, workload, batch, "trl:default"), []))]
        tk = pt[0]["tokens_per_step"]
        per_repeat = [a["cpu_pairs_per_s"] / b["cpu_pairs_per_s"] for a, b in zip(pt, trl)]
        spread = f" ({', '.join(f'{x:.2f}' for x in per_repeat)})" if len(per_repeat) > 1 else ""
        lines.append(
            f"| `{shape}` | {workload} | {batch} x ({pt[0]['warmup']}+{pt[0]['steps']}), "
            f"{min(len(pt), len(trl))} | {tk['pair_tokens']:.0f} ({tk['trl_positions']:.0f}) / "
            f"{tk['pt_tokens']:.0f} ({tk['pt_positions']:.0f}) | {cpu_step(pt):.2f} | {cpu_step(trl):.2f} | "
            f"**{ratio(pt, trl, 'cpu_pairs_per_s'):.2f}x**{spread} | "
            f"{f'{median(old):.2f}x' if old else '-'} | {work_ratio(pt[0]):.2f}x | "
            f"{ratio(pt, trl, 'steady_cpu_pairs_per_s'):.2f}x | {ratio(pt, trl, 'pairs_per_s'):.2f}x | "
            f"{ratio(pt, trl, 'steady_pairs_per_s'):.2f}x | "
            f"{med(pt, 'peak_rss') / GiB:.2f} / {med(trl, 'peak_rss') / GiB:.2f} | "
            f"{ratio(pt, trl, 'peak_rss'):.2f}x | "
            f"{100 * med(pt, 'mfu_steady_cpu'):.0f}% / {100 * med(trl, 'mfu_steady_cpu'):.0f}% | "
            f"{100 * median([mfu_run_cpu(r) for r in pt]):.0f}% / "
            f"{100 * median([mfu_run_cpu(r) for r in trl]):.0f}% | "
            f"{loss_rel(pt[0], trl[0]):.1e} | {margin_scale(pt[0], trl[0]):.1e} | {_ids(trl)} | "
            f"{_load(pt, trl)} |")
    return lines


def _checkpointing_table(groups: Groups) -> list[str]:
    lines = ["", "## preftune checkpointing: auto (default) / full / selective / off", "",
             "Same runs as above (preftune default otherwise). `selective`: matmul and attention outputs "
             "saved, elementwise ops recomputed. Time and memory relative to the default (`auto`, which "
             "chose `off` in these runs).", "",
             "| shape | workload | mode | CPU s/step | wall s/step | vs default (CPU time) | peak RSS GiB | "
             "vs default (RSS) | loss max rel diff vs default | load |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    modes = (("preftune:default", "auto (default)"), ("preftune:default@full", "full"),
             ("preftune:default@selective", "selective"), ("preftune:default@off", "off"))
    for (shape, workload, batch, _), reps, _trl in _default_rows(groups, need_trl=False):
        for mode_run, label in modes:
            m = groups.get((shape, workload, batch, mode_run))
            if m:
                lines.append(f"| `{shape}` | {workload} | {label} | {cpu_step(m):.2f} | "
                             f"{med(m, 'steady_step_s'):.2f} | {cpu_step(m) / cpu_step(reps):.2f}x | "
                             f"{med(m, 'peak_rss') / GiB:.2f} | "
                             f"{med(m, 'peak_rss') / med(reps, 'peak_rss'):.2f}x | "
                             f"{loss_rel(m[0], reps[0]):.1e} | {_load(m)} |")
    return lines


def _longer_table(longer: list[dict]) -> list[str]:
    if not longer:
        return []
    lines = ["", "## A longer run (one epoch of 256 pairs)", "",
             "As the default table, with 1 warm-up + 31 timed steps of 8 pairs (tags ending in `epoch`: "
             "`epoch` = second and third passes, `fourth-*`, `fifth-*`, `sixth-*` = the later passes; the "
             "two trainers of one tag ran in one invocation, in the order listed).", "",
             "| tag | shape | workload | trainer | steps | CPU s/step | e2e s (wall) | CPU e2e pairs/s | "
             "peak RSS GiB | MFU steady / whole run (CPU) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in longer:
        lines.append(f"| {r['tag']} | `{r['shape']}` | {r['workload']} | `{r['run']}` | "
                     f"{r['warmup'] + r['steps']} | {r['steady_cpu_step_s'] / r['threads']:.2f} | "
                     f"{r['e2e_s']:.0f} | {r['cpu_pairs_per_s']:.2f} | {r['peak_rss'] / GiB:.2f} | "
                     f"{100 * r['mfu_steady_cpu']:.0f}% / {100 * mfu_run_cpu(r):.0f}% |")
    by_run = {(r["shape"], r["workload"], r["run"]): r for r in longer}
    ratios = [f"`{shape}` {workload} **{r['cpu_pairs_per_s'] / t['cpu_pairs_per_s']:.2f}x**"
              for (shape, workload, run), r in by_run.items() if run == "preftune:default"
              and (t := by_run.get((shape, workload, "trl:default"))) is not None]
    if ratios:
        lines += ["", "preftune default / TRL default, CPU e2e pairs/s, latest run of each: "
                  + ", ".join(ratios) + "."]
    return lines


def _like_table(groups: Groups) -> list[str]:
    like_rows = [(key, label, b) for key in groups for label, a, b in COMPARISONS[1:]
                 if key[3] == a and key[2] == 8]
    if not like_rows:
        return []
    lines = ["", "## Like for like: the same reference strategy in both", "",
             "(2a) a separate frozen reference model scored every step; (2b) reference log-probs precomputed "
             "in the run. TRL with gradient checkpointing off in both (its like-for-like setting); preftune "
             "otherwise default (unpadded, `auto` -> `off`). Ratios preftune / TRL, as above.", "",
             "| comparison | shape | workload | preftune CPU s/step | TRL CPU s/step | **CPU e2e ratio** | "
             "CPU steady ratio | peak RSS preftune / TRL GiB | MFU steady preftune / TRL | "
             "loss max rel diff | token ids | load |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|---|---:|"]
    for (shape, workload, batch, run), label, trl_run in like_rows:
        pt, trl = groups[(shape, workload, batch, run)], groups.get((shape, workload, batch, trl_run))
        if not trl:
            continue
        lines.append(f"| {label} | `{shape}` | {workload} | {cpu_step(pt):.2f} | {cpu_step(trl):.2f} | "
                     f"**{ratio(pt, trl, 'cpu_pairs_per_s'):.2f}x** | "
                     f"{ratio(pt, trl, 'steady_cpu_pairs_per_s'):.2f}x | {med(pt, 'peak_rss') / GiB:.2f} / "
                     f"{med(trl, 'peak_rss') / GiB:.2f} | {100 * med(pt, 'mfu_steady_cpu'):.0f}% / "
                     f"{100 * med(trl, 'mfu_steady_cpu'):.0f}% | {loss_rel(pt[0], trl[0]):.1e} | "
                     f"{_ids(trl)} | {_load(pt, trl)} |")
    return lines


def _floor_table(rows: list[dict]) -> list[str]:
    floor_rows = [r for r in rows if r["shape"] == "floor"]
    if not floor_rows:
        return []
    z = shape_sizes("floor")
    floor = 16 * z["total"]  # fp32 weights + gradients + AdamW exp_avg + exp_avg_sq
    lines = ["", "## Memory against the floor", "",
             f"`floor` shape: {z['total'] / 1e6:.1f}M parameters; floor = weights + gradients + AdamW state "
             f"(2 moments) in fp32 = 16 B x parameters = **{floor / GiB:.2f} GiB**. Peak RSS includes the "
             "Python interpreter and imports (column 'imports') and, for TRL, its separate reference model "
             f"({4 * z['total'] / GiB:.2f} GiB of weights, which preftune's precomputed reference does not "
             "hold).", "",
             "| run | workload | batch | peak RSS GiB | imports GiB | peak RSS / floor | "
             "(peak - imports) / floor | CPU s/step | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in floor_rows:
        lines.append(f"| `{r['run']}` | {r['workload']} (max_length {r['max_length']}) | {r['batch']} | "
                     f"{r['peak_rss'] / GiB:.2f} | {r['import_rss'] / GiB:.2f} | "
                     f"**{r['peak_rss'] / floor:.2f}x** | {(r['peak_rss'] - r['import_rss']) / floor:.2f}x | "
                     f"{r['steady_cpu_step_s'] / r['threads']:.1f} | {r['loadavg']:.1f} |")
    return lines


def _profile_table(profiles: list[dict]) -> list[str]:
    if not profiles:
        return []
    columns = list(dict.fromkeys(_PROFILE_COLUMNS.get(k, k) for p in profiles
                                 for k in p["categories_per_step"]))
    lines = ["", "## Where preftune's step goes (torch.profiler)", "",
             "Self CPU time per step by kind of op, seconds (share of the profiled total in brackets); "
             f"{profiles[0]['profiled_steps']} steps profiled after 2, batch {profiles[0]['batch']}, "
             "1 thread, preftune default (reference precomputed before the steps). `recompute` (older lines "
             "only) = ops run inside a checkpointed layer's replay during backward, labelled by a "
             "benchmark-side patch since removed; newer lines count them with the decoder's, attention and "
             "other ops.", "",
             "| shape | workload | checkpointing | step s (profiled) | " + " | ".join(columns) + " |",
             "|---|---|---|---:|" + "---:|" * len(columns)]
    for p in profiles:
        c = {_PROFILE_COLUMNS.get(k, k): v for k, v in p["categories_per_step"].items()}
        total = sum(c.values())
        cells = [f"{c[k]:.2f} ({100 * c[k] / total:.0f}%)" if k in c else "-" for k in columns]
        lines.append(f"| `{p['shape']}` | {p['workload']} | {p['checkpointing']} | "
                     f"{median(p['step_s']):.2f} | " + " | ".join(cells) + " |")
    return lines
