"""Per-process memory of parameters, gradients and optimizer state: one process against FSDP2 on two
(preftune's engine/sharding.py, gloo on CPU processes), for a small Llama of the shape of a 60M model.

    python benchmarks/bench_sharded.py   # 1 and 2 processes; appends results, writes SHARDING.md

Each process reports what it holds after one optimizer step of a DPO-style loss: the bytes of its
parameter shards, gradient shards and AdamW state (exp_avg, exp_avg_sq), and its peak RSS. Sharding
splits the first three over the processes; what stays whole is each layer's all-gathered parameters
while it runs and the activations.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "sharding"
LAYERS, HIDDEN, FFN, VOCAB = 8, 512, 1408, 8192


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker() -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.data.batching import collate
    from preftune.data.tokenized import TokenizedPair
    from preftune.engine.sharding import FullyShard
    from preftune.model.logps import SequenceScorer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    scorer = SequenceScorer(LlamaForCausalLM(config))
    if world > 1:
        FullyShard().shard(scorer)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(rank)
    ids = [tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in (128, 96, 96) * 4]
    pairs = [TokenizedPair(ids[i], ids[i + 1], ids[i + 2], 1.0) for i in range(0, len(ids), 3)]
    logps = scorer(collate(pairs, layout="prefix_shared"))  # the root's forward: every shard gathered in turn
    (-torch.nn.functional.logsigmoid(logps.chosen - logps.rejected)).mean().backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    row = {"processes": world, "rank": rank, "parameters": local_bytes(params),
           "gradients": local_bytes(p.grad for p in params if p.grad is not None),
           "optimizer_state": local_bytes(state),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "model": f"Llama {LAYERS} layers, hidden {HIDDEN}, ffn {FFN}, vocab {VOCAB}",
           "parameter_count": sum(p.numel() for p in scorer.model.parameters()) if world == 1 else None}
    print("ROW " + json.dumps(row), flush=True)
    if world > 1:
        dist.destroy_process_group()


def run(processes: int) -> list[dict]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [torchrun, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
               str(port), __file__, "--worker"]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]


def render(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["# Sharded training: memory per process", "",
             "`python benchmarks/bench_sharded.py` (CPU processes, gloo; FSDP2 through "
             "`engine/sharding.py`).",
             f"Model: {rows[0]['model']}. Bytes each process holds after one AdamW step:", "",
             "| processes | rank | parameters | gradients | optimizer state | sum | peak RSS |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        total = r["parameters"] + r["gradients"] + r["optimizer_state"]
        lines.append(f"| {r['processes']} | {r['rank']} | {r['parameters'] / mib:.1f} MiB | "
                     f"{r['gradients'] / mib:.1f} MiB | {r['optimizer_state'] / mib:.1f} MiB | "
                     f"{total / mib:.1f} MiB | {r['peak_rss'] / mib:.0f} MiB |")
    one = next(r for r in rows if r["processes"] == 1)
    two = [r for r in rows if r["processes"] == 2]
    sum_one = one["parameters"] + one["gradients"] + one["optimizer_state"]
    ratios = [(r["parameters"] + r["gradients"] + r["optimizer_state"]) / sum_one for r in two]
    lines += ["", f"Two processes hold {min(ratios):.3f}-{max(ratios):.3f} of one process's parameters, "
              "gradients and optimizer state each (1/2 is the ideal; what is left over is the rounding of "
              "uneven shards). Peak RSS does not halve here: every process loads the whole model before "
              "sharding it (preftune does not yet load weights on the first process only and broadcast "
              "them, accelerate's cpu_ram_efficient_loading), and RSS also counts the interpreter, torch "
              "and the layers gathered while they run. On GPUs the device memory is what halves: parameters, "
              "gradients and optimizer state live there in shards.", ""]
    return "\n".join(lines)


def main() -> None:
    if "--worker" in sys.argv:
        worker()
        return
    rows = run(1) + run(2)
    OUT.mkdir(exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (HERE / "SHARDING.md").write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
