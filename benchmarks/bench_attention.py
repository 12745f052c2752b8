"""A/B of preftune's unpadded forward (model/attention.py) against the dense-mask forward, of
``compile: true`` (model/fusion.py) against the plain unpadded forward, or of the rejected tokens'
attention in blocks of 256 queries against one call per pair (``--compare block``), or of the decoder's
linear layers through oneDNN (``cpu_linear: onednn``, hardware/cpu_linear.py) against PyTorch's own
(``--compare onednn``). By hand.

    python benchmarks/bench_attention.py MODEL_DIR IDS_JSON [--batch 8] [--batches 2] [--rounds 3]
        [--layout prefix_shared] [--checkpointing full] [--compare dense|compile|block|onednn]
        [--out benchmarks/shapes-data/attention.jsonl]

``IDS_JSON`` is a list of ``[prompt_ids, chosen_ids, rejected_ids]`` (``bench_dpo.py`` writes one per
shape and workload: ``<work-dir>/<shape>/<workload>.ids.json``). Each round times one forward + backward
of the sum of per-sequence log-probs for ``--batches`` batches of ``--batch`` pairs, first dense then
unpadded (``--compare compile``: unpadded then unpadded + compiled; ``block``: one rejected call
per pair then blocks of ``REJECTED_BLOCK`` queries; ``onednn``: torch's linear layers then oneDNN's; the order alternates per round; `a_cpu_s` and
`b_cpu_s` are the two arms, `speedup` = a / b), in CPU time (user + system of this process, one thread unless
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
    parser.add_argument("--compare", default="dense", choices=("dense", "compile", "block", "onednn"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from preftune.data.batching import collate
    from preftune.data.tokenize import TokenizedPair
    from preftune.hardware.cpu_linear import use_onednn
    from preftune.model import attention
    from preftune.model.checkpointing import enable_checkpointing
    from preftune.model.fusion import compile_layers
    from preftune.model.logps import SequenceScorer

    torch.set_num_threads(args.threads)
    rows = json.loads(Path(args.ids_json).read_text())
    pairs = [TokenizedPair(tuple(p), tuple(c), tuple(r)) for p, c, r in rows[: args.batch * args.batches]]
    batches = [collate(pairs[i : i + args.batch], layout=args.layout) for i in range(0, len(pairs), args.batch)]
    def load():
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train()
        enable_checkpointing(model, args.checkpointing)
        return model

    plain = load()
    if args.compare == "compile":
        compiled = load()
        compile_layers(compiled)
        scorers = {False: SequenceScorer(plain), True: SequenceScorer(compiled)}
    elif args.compare == "onednn":
        fast = load()
        use_onednn(fast)
        scorers = {False: SequenceScorer(plain), True: SequenceScorer(fast)}
    elif args.compare == "block":
        scorers = {False: SequenceScorer(plain), True: SequenceScorer(plain)}
    else:
        scorers = {False: SequenceScorer(plain, unpadded=False), True: SequenceScorer(plain)}
    block = attention.REJECTED_BLOCK

    def timed(arm: bool) -> tuple[float, list[float]]:
        scorer = scorers[arm]
        if args.compare == "block":  # arm a: the whole rejected part in one call
            attention.REJECTED_BLOCK = block if arm else 2**31
        model = scorer.model
        start, logps = time.process_time(), []
        for batch in batches:
            out = scorer(batch)
            (out.chosen.sum() + out.rejected.sum()).backward()
            logps += [*out.chosen.tolist(), *out.rejected.tolist()]
        model.zero_grad(set_to_none=True)
        return time.process_time() - start, logps

    timed(True)  # warm-up (and the compilation)
    timed(False)
    for round_ in range(args.rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        result = {flag: timed(flag) for flag in order}
        (dense_s, dense), (flat_s, flat) = result[False], result[True]
        line = {"model": args.model_dir, "ids": args.ids_json, "layout": args.layout, "compare": args.compare,
                "checkpointing": args.checkpointing, "batch": args.batch, "batches": args.batches,
                "positions_dense": sum(b.input_ids.numel() for b in batches),
                "real_tokens": sum(b.num_real_tokens for b in batches), "round": round_,
                "a_cpu_s": round(dense_s, 3), "b_cpu_s": round(flat_s, 3),
                "speedup": round(dense_s / flat_s, 3),
                "max_abs_logp_diff": max(abs(a - b) for a, b in zip(dense, flat)),
                "max_abs_logp": max(abs(a) for a in dense), "load": os.getloadavg()[0]}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
