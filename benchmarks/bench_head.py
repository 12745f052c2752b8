"""Micro-benchmarks behind the optimisation suggestions in RESULTS.md (run by hand, never in CI).

    python benchmarks/bench_head.py [--tokens 2000] [--chunks 1024,256,128] [--reps 3]
        [--cpu-allocator fast]

1. The LM head at scored positions, forward + backward: ``preftune.model.logps.HeadLogps`` (saves only
   ``logsumexp``, one reused ``[chunk, vocab]`` buffer, logits gradient built in place, ``dW``
   accumulated in place) vs the generic path it replaced (``_token_logps`` under
   ``torch.utils.checkpoint`` per chunk, still used for heads with logit post-processing), and
   ``HeadLogps`` keeping its probabilities (``keep_probs``: what checkpointing ``off`` does where they
   fit; no recomputing matmul, ``[tokens, vocab]`` fp32 held until backward). Same results (checked).
2. One AdamW step over the benchmark model's 76.8M parameters: ``foreach`` (preftune's default,
   ``torch.optim.AdamW(params, lr=...)``) vs ``fused=True`` (what TRL/transformers use,
   ``adamw_torch_fused``).
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch
from torch.utils.checkpoint import checkpoint

from preftune.model.logps import HeadLogps, _token_logps


class PeakRSS:
    """Highest RSS above the level at entry, sampled every millisecond by a thread (CPU tensors are not
    tracked by any allocator statistic; freed memory may stay in the process, so this is an upper bound
    on what the block needs and a lower bound is the delta of the first call)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="scored tokens per step")
    parser.add_argument("--chunks", default="1024,256", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--cpu-allocator", default="system", choices=("fast", "lean", "system"),
                        help="glibc's settings as preftune's cpu_allocator sets them "
                             "(training's default: fast)")
    return parser.parse_args()


def head_benchmark(args: argparse.Namespace) -> None:
    """The LM head's forward + backward three ways, per chunk size: time, GFLOP/s, CPU time, peak RSS."""
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    flops = 8 * args.tokens * args.hidden * args.vocab  # forward, recomputation, two gradient matmuls

    def generic(chunk):
        def run():
            pieces = [checkpoint(_token_logps, head, h, t, lambda x: x, use_reentrant=False)
                      for h, t in zip(hidden.split(chunk), targets.split(chunk))]
            torch.cat(pieces).sum().backward()
        return run

    def fused(chunk, keep_probs=False):
        def run():
            HeadLogps.apply(hidden, head.weight, None, targets, chunk, keep_probs).sum().backward()
        return run

    def kept(chunk):
        return fused(chunk, keep_probs=True)

    # same values and gradients
    grads = []
    for make in (generic, fused, kept):
        head.weight.grad, hidden.grad = None, None
        make(256)()
        grads.append((head.weight.grad.clone(), hidden.grad.clone()))
    diff = max((a - b).abs().max().item() for other in grads[1:] for a, b in zip(grads[0], other))
    print(f"LM head fwd+bwd, {args.tokens} scored tokens, H={args.hidden}, V={args.vocab} "
          f"(max grad diff {diff:.1e})")
    arms = (("checkpoint (generic)", generic), ("HeadLogps", fused), ("HeadLogps keep_probs", kept))
    for chunk in args.chunks:
        for name, make in arms:
            cpu0 = time.process_time()
            with PeakRSS() as mem:
                seconds = timed(make(chunk), args.reps)
            cpu = (time.process_time() - cpu0) / (args.reps + 1)
            print(f"  chunk {chunk:5d}  {name:20s} {seconds:6.2f} s  "
                  f"({flops / seconds / 1e9:5.1f} GFLOP/s of 4 matmuls, CPU {cpu:.2f} s, "
                  f"peak RSS +{mem.peak / 2**20:.0f} MiB)")


def adamw_benchmark(args: argparse.Namespace) -> None:
    """One AdamW step over 76.8M parameters, foreach against fused: time and peak RSS."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (25_731_584, 25_731_584, 25_305_600)]
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"AdamW step over {sum(p.numel() for p in params) / 1e6:.1f}M parameters")
    for name, kwargs in (("foreach", {}), ("fused=True (preftune, TRL)", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-6, **kwargs)
        opt.step()  # allocate the state outside the measurement
        with PeakRSS() as mem:
            seconds = timed(opt.step, args.reps)
        print(f"  {name:26s} {seconds:.3f} s  (peak RSS +{mem.peak / 2**20:.0f} MiB during the step)")


def main() -> None:
    args = parse_args()
    from preftune.hardware import allocator

    allocator.apply(args.cpu_allocator)
    head_benchmark(args)
    adamw_benchmark(args)


if __name__ == "__main__":
    main()
