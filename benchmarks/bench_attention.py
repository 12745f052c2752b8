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
per pair then blocks of ``REJECTED_BLOCK`` queries; ``onednn``: torch's linear layers then oneDNN's; the
order alternates per round; `a_cpu_s` and `b_cpu_s` are the two arms, `speedup` = a / b), in CPU time
(user + system of this process, one thread unless ``--threads``), and checks both give the same
log-probs. Prints and appends one JSON line per round.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


def scorers(args: argparse.Namespace) -> dict[bool, Any]:
    """The two arms' ``SequenceScorer``: ``False`` = a (dense, plain, one call, torch), ``True`` = b."""
    import torch
    from transformers import AutoModelForCausalLM

    from preftune.hardware.cpu_linear import use_onednn
    from preftune.model.checkpointing import enable_checkpointing
    from preftune.model.fusion import compile_layers
    from preftune.model.logps import SequenceScorer

    def load():
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train()
        enable_checkpointing(model, args.checkpointing)
        return model

    plain = load()
    if args.compare == "compile":
        compiled = load()
        compile_layers(compiled)
        return {False: SequenceScorer(plain), True: SequenceScorer(compiled)}
    if args.compare == "onednn":
        fast = load()
        use_onednn(fast)
        return {False: SequenceScorer(plain), True: SequenceScorer(fast)}
    if args.compare == "block":
        return {False: SequenceScorer(plain), True: SequenceScorer(plain)}
    return {False: SequenceScorer(plain, unpadded=False), True: SequenceScorer(plain)}


def main() -> None:
    args = parse_args()
    import torch

    from preftune.data.batching import collate
    from preftune.data.tokenize import TokenizedPair
    from preftune.model import attention

    torch.set_num_threads(args.threads)
    rows = json.loads(Path(args.ids_json).read_text())
    pairs = [TokenizedPair(tuple(p), tuple(c), tuple(r)) for p, c, r in rows[: args.batch * args.batches]]
    batches = [collate(pairs[i : i + args.batch], layout=args.layout)
               for i in range(0, len(pairs), args.batch)]
    arms = scorers(args)
    block = attention.REJECTED_BLOCK

    def timed(arm: bool) -> tuple[float, list[float]]:
        scorer = arms[arm]
        if args.compare == "block":  # arm a: the whole rejected part in one call
            attention.REJECTED_BLOCK = block if arm else 2**31
        start, logps = time.process_time(), []
        for batch in batches:
            out = scorer(batch)
            (out.chosen.sum() + out.rejected.sum()).backward()
            logps += [*out.chosen.tolist(), *out.rejected.tolist()]
        scorer.model.zero_grad(set_to_none=True)
        return time.process_time() - start, logps

    timed(True)  # warm-up (and the compilation)
    timed(False)
    for round_ in range(args.rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        result = {flag: timed(flag) for flag in order}
        line = _round_line(args, batches, round_, result[False], result[True])
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


def _round_line(args: argparse.Namespace, batches: list, round_: int, a: tuple[float, list[float]],
                b: tuple[float, list[float]]) -> dict[str, Any]:
    """One round's JSON line: both arms' CPU seconds, the speed-up a / b, the largest log-prob difference."""
    (a_s, a_logps), (b_s, b_logps) = a, b
    return {"model": args.model_dir, "ids": args.ids_json, "layout": args.layout, "compare": args.compare,
            "checkpointing": args.checkpointing, "batch": args.batch, "batches": args.batches,
            "positions_dense": sum(x.input_ids.numel() for x in batches),
            "real_tokens": sum(x.num_real_tokens for x in batches), "round": round_,
            "a_cpu_s": round(a_s, 3), "b_cpu_s": round(b_s, 3), "speedup": round(a_s / b_s, 3),
            "max_abs_logp_diff": max(abs(x - y) for x, y in zip(a_logps, b_logps)),
            "max_abs_logp": max(abs(x) for x in a_logps), "load": os.getloadavg()[0]}


if __name__ == "__main__":
    main()
