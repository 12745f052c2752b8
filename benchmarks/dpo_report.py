"""RESULTS.md of ``bench_dpo.py`` (``run`` and ``render``): a worker's result summarised (throughput, MFU,
memory), the preftune / TRL comparisons and their numerics, and the report's text."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench_common import COMPARISONS, machine, machine_text, median, versions_line
from dpo_setup import effective_preftune_options, preftune_options

GiB = 2**30
_MEDIANS = ("pairs_per_s", "tokens_per_s", "steady_step_s", "steady_pairs_per_s", "cpu_pairs_per_s",
            "steady_cpu_step_s", "peak_rss", "mfu_e2e", "mfu_steady", "mfu_steady_cpu")


def _flops(stats: dict, tokens: list[int], sizes: dict, steps: range, precomputed: bool,
           with_precompute: bool) -> float:
    """Model FLOPs of ``steps`` (the script docstring's model): policy 6 N T + 6 H V S, a reference forward
    2 N T + 2 H V S per step, or once per pair in the precompute pass (the dataset = the trained pairs)."""
    n, hv = sizes["non_embedding"], sizes["head"]
    total = 0.0
    for s in steps:
        t, sc = tokens[s], stats["scored"][s]
        total += 6 * n * t + 6 * hv * sc
        if not precomputed:
            total += 2 * n * t + 2 * hv * sc
    if with_precompute and precomputed:
        total += 2 * n * sum(tokens) + 2 * hv * sum(stats["scored"])
    return total


def summarize(result: dict, stats: dict, sizes: dict, peaks: tuple[float, float], warmup: int, batch: int,
              n_pairs: int) -> dict:
    """A worker's result as the report reads it: end-to-end and steady throughput, wall and CPU time, MFU."""
    trainer, mode = result["run"].split(":")
    n_steps = len(result["step_end_s"])
    tokens = stats["pt_tokens"] if trainer == "preftune" else stats["pair_tokens"]
    precomputed = result.get("reference_mode", mode) == "precomputed"
    peak, peak_cpu = peaks
    threads = result["threads"]
    ends, cpu_ends = result["step_end_s"], result["step_end_cpu_s"]
    steady_s = ends[-1] - ends[warmup - 1] if warmup else ends[-1]
    steady_cpu = cpu_ends[-1] - cpu_ends[warmup - 1] if warmup else cpu_ends[-1]
    steady = range(warmup, n_steps)
    steady_flops = _flops(stats, tokens, sizes, steady, precomputed, False)
    e2e = result["e2e_s"]
    cpu_s = result["user_s"] + result["sys_s"]
    return {
        "run": result["run"],
        "e2e_s": e2e,
        "pairs_per_s": n_pairs / e2e,
        "tokens_per_s": sum(stats["pair_tokens"]) / e2e,
        "steady_pairs_per_s": batch * len(steady) / steady_s,
        "steady_step_s": steady_s / len(steady),
        "first_step_end_s": ends[0],
        "peak_rss": result["peak_rss"],
        "import_rss": result["import_rss"],
        "mfu_e2e": _flops(stats, tokens, sizes, range(n_steps), precomputed, True) / e2e / peak,
        "mfu_steady": steady_flops / steady_s / peak,
        # CPU-time view: as if the process had had its threads' cores to itself (robust to other load)
        "cpu_s": cpu_s,
        "threads": threads,
        "cpu_pairs_per_s": n_pairs / (cpu_s / threads),
        "steady_cpu_step_s": steady_cpu / len(steady),
        "steady_cpu_pairs_per_s": batch * len(steady) / (steady_cpu / threads),
        "mfu_steady_cpu": steady_flops / (steady_cpu / threads) / peak_cpu,
        "metrics": result["metrics"],
        "token_mismatches": result.get("token_mismatches"),
        "user_s": result["user_s"], "sys_s": result["sys_s"], "gpu_peak": result.get("gpu_peak"),
        "loadavg": max(result["loadavg_start"], result["loadavg_end"]),
        "reference_mode": result.get("reference_mode", mode),
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def numerics(p: dict, t: dict, k: int) -> dict:
    """Max relative / absolute differences of the first ``k`` steps' metrics, preftune ``p`` vs TRL ``t``."""
    out = {}
    for key in ("loss", "rewards/margins", "grad_norm", "rewards/chosen", "rewards/rejected"):
        pairs = [(a.get(key), b.get(key)) for a, b in zip(p["metrics"][:k], t["metrics"][:k])]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            out[key] = {"max_rel": max(rel(a, b) for a, b in pairs),
                        "max_abs": max(abs(a - b) for a, b in pairs),
                        "preftune": [a for a, _ in pairs], "trl": [b for _, b in pairs]}
    # a reward is beta * (logp - logp_ref) of sums of ~|logps| magnitude: in fp32 the difference of two such
    # sums is only resolved to ~|logps| * 6e-8, so margins near 0 cannot agree in relative terms. Scale:
    scale = [0.1 * max(abs(a.get("logps/chosen", 0.0)), abs(a.get("logps/rejected", 0.0)))
             for a in p["metrics"][:k]]
    if "rewards/margins" in out and scale:
        margins = out["rewards/margins"]
        margins["abs_over_beta_logps"] = margins["max_abs"] / max(max(scale), 1e-30)
    return out


def stand_in(res: dict, name: str) -> str:
    """``preftune:precomputed`` when it ran, else ``preftune:default`` if that run precomputed."""
    default = res.get("preftune:default") or []
    if name == "preftune:precomputed" and not res.get(name) and default and all(
            r["reference_mode"] == "precomputed" for r in default):
        return "preftune:default"
    return name


def _compared(res: dict) -> list[tuple[str, str, str]]:
    """(label, preftune run, TRL run) of the comparisons both of whose runs are in ``res``."""
    out = []
    for label, a, b in COMPARISONS:
        a = stand_in(res, a)
        if res.get(a) and res.get(b):
            out.append((label, a, b))
    return out


# ---- the report -----------------------------------------------------------------------------------------
def render(args: argparse.Namespace, plan: dict, sizes: dict, peaks: tuple[float, float], results: dict,
           elapsed: float | None) -> str:
    """RESULTS.md's generated part: header, one section per workload, notes."""
    lines = _header(args, sizes, peaks, elapsed)
    for workload in args.workloads:
        res = results[workload]
        lines += _workload_intro(args, plan, workload)
        lines += _runs_table(res) + _ratios_table(res) + _numerics_table(args, res)
        lines += _per_step_table(args, res) + _every_run_table(res)
        bad = [r["token_mismatches"] for reps in res.values() for r in reps if r.get("token_mismatches")]
        lines += ["", "Token ids TRL trained on vs preftune's: "
                  + (f"**{sum(bad)} mismatches**" if bad else "identical in every TRL run") + ".", ""]
    return "\n".join(lines + _notes(results))


def _header(args: argparse.Namespace, sizes: dict, peaks: tuple[float, float],
            elapsed: float | None) -> list[str]:
    peak, peak_cpu = peaks
    cmd = "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:])
    mach = machine()
    options = ", ".join(f"{k} {v}" for k, v in effective_preftune_options(args).items())
    given = " (preftune's defaults)" if not preftune_options(args) else " (overridden on the command line)"
    return [
        "# preftune vs TRL DPOTrainer: speed and memory",
        "",
        "Generated by `benchmarks/bench_dpo.py` (issue 5); run by hand, never in CI. See the script's "
        "docstring for the method, and the notes below for what the numbers mean.",
        "",
        "Across model shapes (LM head 50% / 20% / 5% of the matmul parameters), workloads, checkpointing "
        "modes, memory against the floor and scaling with sequence length (issue 15): "
        "[SHAPES.md](SHAPES.md).",
        "",
        f"Command: `{cmd.strip()}`" + (f" ({elapsed / 60:.1f} min)" if elapsed else ""),
        "",
        f"Machine: {machine_text(mach)}; torch threads {mach['torch_threads']}; fp32 matmul peak measured "
        f"in this run (best of start and end): **{peak / 1e9:.1f} GFLOP/s** per wall second, "
        f"{peak_cpu / 1e9:.1f} GFLOP/s per CPU second / threads.",
        "",
        versions_line(),
        "",
        f"Model: Llama, 8 layers, hidden 512, 8 heads, intermediate 1376, vocab 50257, untied; "
        f"{sizes['non_embedding'] / 1e6:.2f}M non-embedding parameters, LM head {sizes['head'] / 1e6:.2f}M. "
        f"fp32, batch {args.batch_size} pairs, max_length {args.max_length}, beta 0.1, AdamW lr 1e-6, linear "
        f"decay, grad clip 1.0, dropout off; {args.warmup} warm-up + {args.steps} timed steps per run, "
        f"{args.repeats} repeat(s) alternated; preftune options: " + options + given + ".",
        "",
    ]


def _workload_intro(args: argparse.Namespace, plan: dict, workload: str) -> list[str]:
    st = plan["workloads"][workload]["stats"]
    ln = st["lengths"]

    def mean(key: str) -> float:
        return sum(st[key]) / len(st[key])

    layout = effective_preftune_options(args)["layout"]
    return [
        f"## Workload `{workload}`",
        "",
        f"{plan['n_pairs']} pairs; tokens per pair: prompt {ln['prompt']['mean']:.1f} (min "
        f"{ln['prompt']['min']}, max {ln['prompt']['max']}), chosen {ln['chosen']['mean']:.1f} (max "
        f"{ln['chosen']['max']}), rejected {ln['rejected']['mean']:.1f} (max {ln['rejected']['max']}). "
        f"Per step on average: {mean('pair_tokens'):.0f} real tokens as TRL runs them "
        f"({mean('trl_positions'):.0f} positions with padding), {mean('pt_tokens'):.0f} as preftune "
        f"`{layout}` runs them ({mean('pt_positions'):.0f} positions), {mean('scored'):.0f} scored tokens.",
        "",
    ]


def _runs_table(res: dict) -> list[str]:
    lines = ["| run | e2e pairs/s | e2e tokens/s | steady s/step | steady pairs/s | CPU-time e2e pairs/s | "
             "CPU-time steady s/step | peak RSS GiB | MFU e2e | MFU steady | MFU steady (CPU-time) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, reps in res.items():
        if not reps:
            continue
        m = {k: median([r[k] for r in reps]) for k in _MEDIANS}
        threads = reps[0].get("threads", 1)
        lines.append(f"| `{name}` | {m['pairs_per_s']:.3f} | {m['tokens_per_s']:.0f} | "
                     f"{m['steady_step_s']:.2f} | {m['steady_pairs_per_s']:.3f} | "
                     f"{m['cpu_pairs_per_s']:.3f} | {m['steady_cpu_step_s'] / threads:.2f} | "
                     f"{m['peak_rss'] / GiB:.2f} | {100 * m['mfu_e2e']:.1f}% | "
                     f"{100 * m['mfu_steady']:.1f}% | {100 * m['mfu_steady_cpu']:.1f}% |")
    return lines


def _ratios_table(res: dict) -> list[str]:
    lines = ["", "| comparison | e2e pairs/s ratio (per repeat) | steady ratio | CPU-time e2e ratio | "
             "CPU-time steady ratio | peak RSS ratio | target |", "|---|---:|---:|---:|---:|---:|---|"]
    for label, a, b in _compared(res):
        def ratios(key: str, a=a, b=b) -> list[float]:
            return [x[key] / y[key] for x, y in zip(res[a], res[b])]

        e2e = ratios("pairs_per_s")
        target = (">= 2.0x speed, <= 0.5x memory" if a == "preftune:default" and b == "trl:default"
                  else ">= 1.5x speed")
        each = ", ".join(f"{r:.2f}" for r in e2e)
        lines.append(f"| {label}: `{a}` / `{b}` | **{median(e2e):.2f}x** ({each}) "
                     f"| {median(ratios('steady_pairs_per_s')):.2f}x "
                     f"| {median(ratios('cpu_pairs_per_s')):.2f}x "
                     f"| {median(ratios('steady_cpu_pairs_per_s')):.2f}x | {median(ratios('peak_rss')):.2f}x "
                     f"| {target} |")
    return lines


def _numerics_table(args: argparse.Namespace, res: dict) -> list[str]:
    lines = ["", f"Numerics, first {args.numerics_steps} steps (repeat 0), max relative difference "
             "preftune vs TRL (max absolute in brackets); last column: max |margin difference| / "
             "(beta * max |logps|), i.e. against the size of the summed log-probs the margin is a "
             "difference of:", "",
             "| comparison | loss | rewards/margins | grad_norm | margins vs beta*|logps| |",
             "|---|---:|---:|---:|---:|"]
    for label, a, b in _compared(res):
        num = numerics(res[a][0], res[b][0], args.numerics_steps)
        cells = [f"{num[k]['max_rel']:.1e} [{num[k]['max_abs']:.1e}]" if k in num else "n/a"
                 for k in ("loss", "rewards/margins", "grad_norm")]
        cells.append(f"{num['rewards/margins'].get('abs_over_beta_logps', float('nan')):.1e}"
                     if "rewards/margins" in num else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _per_step_table(args: argparse.Namespace, res: dict) -> list[str]:
    first = res.get("preftune:default") or next(iter(v for v in res.values() if v))
    trl_first = res.get("trl:model") or res.get("trl:default") or []
    if not (first and trl_first):
        return []
    lines = ["", "Per step (repeat 0), preftune default / TRL separate reference:", "",
             "| step | loss | rewards/margins | grad_norm |", "|---:|---|---|---|"]
    k = args.numerics_steps
    for s, (x, y) in enumerate(zip(first[0]["metrics"][:k], trl_first[0]["metrics"][:k])):
        cells = [f"{x.get(key, float('nan')):.7g} / {y.get(key, float('nan')):.7g}"
                 for key in ("loss", "rewards/margins", "grad_norm")]
        lines.append(f"| {s + 1} | " + " | ".join(cells) + " |")
    return lines


def _every_run_table(res: dict) -> list[str]:
    gpu = any(r.get("gpu_peak") for v in res.values() for r in v)
    lines = ["", "Every run (the spread shows the noise of this machine; load = 1-min load average, max of "
             "start/end; CPU s = user + system time of the worker):", "",
             "| run | repeat | e2e s | first step ends at s | steady s/step | CPU s (user + sys) | load | "
             "peak RSS GiB" + (" | GPU peak GiB |" if gpu else " |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for name, reps in res.items():
        for r in reps:
            gpu_cell = f" {r['gpu_peak'] / GiB:.2f} |" if r.get("gpu_peak") else ""
            lines.append(f"| `{name}` | {r['repeat']} | {r['e2e_s']:.1f} | {r['first_step_end_s']:.1f} | "
                         f"{r['steady_step_s']:.2f} | {r['user_s']:.0f} + {r['sys_s']:.0f} | "
                         f"{r['loadavg']:.1f} | {r['peak_rss'] / GiB:.2f} |{gpu_cell}")
    return lines


def _notes(results: dict[str, Any]) -> list[str]:
    def import_rss(name: str) -> float:
        return median([r["import_rss"] for w in results.values() for r in w.get(name, [])]) / GiB

    imports = ", ".join(f"{name}: {import_rss(name):.2f} GiB" for name in ("preftune:default", "trl:model")
                        if any(w.get(name) for w in results.values()))
    return [
        "## Notes",
        "",
        "* e2e = from the start of the run (model load, data tokenization, reference load, any reference "
        "precompute pass) to the end of the last optimizer step, excluding interpreter start and imports; "
        "pairs/s and tokens/s count every trained pair/token (warm-up included). e2e tokens/s counts the "
        "pairs' real tokens as TRL runs them (prompt twice + chosen + rejected) for both trainers, so its "
        "ratio equals the pairs/s ratio. steady = the timed steps only (after warm-up).",
        "* peak RSS = `getrusage(RUSAGE_SELF).ru_maxrss` of the worker process (one process per run), "
        "imports included (about " + imports + " after imports).",
        "* MFU uses the FLOP model of the script docstring (tokens the layout actually runs; the LM head "
        "only at scored positions; no credit for recomputation or padding) over the fp32 matmul peak "
        "measured above.",
        "* Results are medians over repeats; ratios are taken per repeat (A/B/A/B in one invocation).",
        "* CPU-time columns divide by the worker's CPU time (user + system, all threads) / thread count "
        "instead of wall time: what the run would take with its cores to itself. They are the robust "
        "numbers when other jobs share the machine (see the load column); CPU-time s/step is CPU seconds / "
        "threads.",
        "",
    ]
