"""fp32 products of a linear layer on the CPU: MKL (``torch.mm``) against oneDNN
(``preftune.hardware.cpu_linear.onednn_linear``, what ``cpu_linear: onednn`` runs). By hand.

    python benchmarks/bench_linear.py [--tokens 8607] [--hidden 512] [--ffn 1408] [--vocabs 1280,6272,25088]
        [--chunk 256] [--rounds 9] [--threads 1]

For each decoder shape ``[tokens, in] x [in, out]`` it times the forward ``x W^T``, the input
gradient ``dy W`` and the weight gradient ``dy^T x`` both ways, and for the chunked output layer the
logits ``[chunk, hidden] x [hidden, V]`` and ``dh``; CPU time, the arms interleaved per round,
medians in GFLOP/s. SHAPES.md (``cpu_linear``, fifth pass) has the figures (``shapes-data/cpu-linear.txt``).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8607)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocabs", default="1280,6272,25088")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    def report(label: str, flops: float, arms: dict) -> None:
        times = {name: [] for name in arms}
        for fn in arms.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in arms.items():
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
        cells = "  ".join(f"{name} {flops / sorted(t)[len(t) // 2] / 1e9:.0f}" for name, t in times.items())
        print(f"{label}: {cells} GFLOP/s", flush=True)

    h, f, n = args.hidden, args.ffn, args.tokens
    for k, m in [(h, h), (h, f), (f, h)]:
        report(f"[{n}, {k}] x [{k}, {m}]", 2 * n * k * m, linear_arms(torch.randn(n, k), torch.randn(m, k),
                                                                     torch.randn(n, m)))
    for vocab in map(int, args.vocabs.split(",")):
        report(f"head chunk [{args.chunk}, {h}] x [{h}, {vocab}]", 2 * args.chunk * h * vocab,
               head_arms(torch.randn(args.chunk, h), torch.randn(vocab, h), torch.randn(args.chunk, vocab)))


def linear_arms(x, w, dy) -> dict:
    """The three products of ``y = x W^T`` (x ``[n, k]``, W ``[m, k]``, dy ``[n, m]``), both ways."""
    import torch

    from preftune.hardware.cpu_linear import onednn_linear as onednn

    return {
        "forward mkl": lambda: torch.nn.functional.linear(x, w),
        "forward onednn": lambda: onednn(x, w, None),
        "dx mkl": lambda: dy.mm(w),
        "dx onednn": lambda: onednn(dy, w.t(), None),
        "dW mkl": lambda: dy.t().mm(x),
        "dW onednn": lambda: onednn(dy.t(), x.t(), None),
    }


def head_arms(hidden, w, d) -> dict:
    """The output layer's chunk products: logits into a reused buffer (as ``HeadLogps``) and ``dh``."""
    import torch

    from preftune.hardware.cpu_linear import onednn_linear as onednn

    out = torch.empty(hidden.shape[0], w.shape[0])
    return {
        "logits mkl": lambda: torch.mm(hidden, w.t(), out=out),
        "logits onednn": lambda: onednn(hidden, w, None),
        "dh mkl": lambda: d @ w,
        "dh onednn": lambda: onednn(d, w.t(), None),
    }


if __name__ == "__main__":
    main()
