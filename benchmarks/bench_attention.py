"""A/B of preftune's unpadded forward (model/attention.py) against the dense-mask forward. By hand.

    python benchmarks/bench_attention.py MODEL_DIR IDS_JSON [--batch 8] [--batches 2] [--rounds 3]
        [--layout prefix_shared] [--checkpointing full] [--out benchmarks/shapes-data/attention.jsonl]

``IDS_JSON`` is a list of ``[prompt_ids, chosen_ids, rejected_ids]`` (``bench_dpo.py`` writes one per
shape and workload: ``<work-dir>/<shape>/<workload>.ids.json``). Each round times one forward + backward
of the sum of per-sequence log-probs for ``--batches`` batches of ``--batch`` pairs, first dense then
unpadded (the order alternates per round), in CPU time (user + system of this process, one thread unless
``--threads``), and checks both give the same log-probs. Prints and appends one JSON line per round.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("ids_json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layout", default="prefix_shared", choices=("packed", "prefix_shared"))
    parser.add_argument("--checkpointing", default="full", choices=("full", "selective", "off"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from preftune.data.batching import collate
    from preftune.data.tokenize import TokenizedPair
    from preftune.model.checkpointing import enable_checkpointing
    from preftune.model.logps import SequenceScorer

    torch.set_num_threads(args.threads)
    rows = json.loads(Path(args.ids_json).read_text())
    pairs = [TokenizedPair(tuple(p), tuple(c), tuple(r)) for p, c, r in rows[: args.batch * args.batches]]
    batches = [collate(pairs[i : i + args.batch], layout=args.layout) for i in range(0, len(pairs), args.batch)]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train()
    enable_checkpointing(model, args.checkpointing)

    def timed(unpadded: bool) -> tuple[float, list[float]]:
        scorer = SequenceScorer(model, unpadded=unpadded)
        start, logps = time.process_time(), []
        for batch in batches:
            out = scorer(batch)
            (out.chosen.sum() + out.rejected.sum()).backward()
            logps += [*out.chosen.tolist(), *out.rejected.tolist()]
        model.zero_grad(set_to_none=True)
        return time.process_time() - start, logps

    timed(True)  # warm-up
    for round_ in range(args.rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        result = {flag: timed(flag) for flag in order}
        (dense_s, dense), (flat_s, flat) = result[False], result[True]
        line = {"model": args.model_dir, "ids": args.ids_json, "layout": args.layout,
                "checkpointing": args.checkpointing, "batch": args.batch, "batches": args.batches,
                "positions_dense": sum(b.input_ids.numel() for b in batches),
                "real_tokens": sum(b.num_real_tokens for b in batches), "round": round_,
                "dense_cpu_s": round(dense_s, 3), "unpadded_cpu_s": round(flat_s, 3),
                "speedup": round(dense_s / flat_s, 3),
                "max_abs_logp_diff": max(abs(a - b) for a, b in zip(dense, flat)),
                "max_abs_logp": max(abs(a) for a in dense), "load": os.getloadavg()[0]}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
