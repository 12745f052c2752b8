"""``bench_data.py generate``: a preference file of N pairs, as long as UltraFeedback's, built from the
HH-RLHF harmless-base test pairs (the recipe: ``bench_data.py``'s docstring), and its ``.meta.json``."""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shlex
import sys
import time
from pathlib import Path

from bench_common import REPO, hh_rows

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """``1234567`` -> ``"one million two hundred thirty-four thousand five hundred sixty-seven"``."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + words(n % 100))
    for size, name in ((10**9, "billion"), (10**6, "million"), (10**3, "thousand")):
        if n >= size:
            return words(n // size) + " " + name + ("" if n % size == 0 else " " + words(n % size))
    raise AssertionError(n)


def _hh_parts(hh_file: Path) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """(explicit pairs, first human turns, assistant replies) of the HH file."""
    pairs, firsts, replies = [], [], []
    for row, pair in hh_rows(hh_file):
        if pair is not None:
            pairs.append(pair)
        first = row["chosen"].split("\n\nHuman:", 2)
        if len(first) > 1:
            firsts.append(first[1].split("\n\nAssistant:", 1)[0].strip())
        for text in (row["chosen"], row["rejected"]):
            for turn in text.split("\n\nAssistant:")[1:]:
                reply = turn.split("\n\nHuman:", 1)[0].strip()
                if len(reply) >= 40:  # a paragraph, not "Yes." or "Sure!"
                    replies.append(reply)
    # the set removes the shared turns of chosen/rejected; sorted: deterministic
    replies = sorted(set(replies))
    return pairs, [f for f in firsts if f], replies


def generate(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else Path(f"pairs-{args.pairs}.jsonl")
    if not out.is_absolute() and out.parent == Path("."):
        out = Path(args.work_dir) / out
    out = out.resolve()
    if out.is_relative_to(REPO):
        raise SystemExit(f"{out}: generated files go outside the repository (e.g. under {args.work_dir})")
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs, firsts, replies = _hh_parts(Path(args.hh_file))
    rng = random.Random(args.seed)
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".part")
    totals = {"prompt": 0, "chosen": 0, "rejected": 0}

    def extend(text: str) -> str:
        target = rng.randint(args.min_chars, args.max_chars)
        parts = [text]
        n = len(text)
        while n < target:
            reply = rng.choice(replies)
            parts.append("\n\n" + reply)
            n += 2 + len(reply)
        return "".join(parts)

    opener = gzip.open if out.suffix == ".gz" else open
    kwargs = {"compresslevel": 6} if out.suffix == ".gz" else {}
    with opener(tmp, "wt", encoding="utf-8", newline="\n", **kwargs) as f:
        for i in range(args.pairs):
            p, c, r = pairs[rng.randrange(len(pairs))]
            # HH prompts start with it: the other dialogue's question joins the first turn
            head = "\n\nHuman:"
            rest = p[len(head):].lstrip() if p.startswith(head) else p
            prompt = f"{head} {rng.choice(firsts)} (This is request number {words(i + 1)}.) {rest}"
            row = {"prompt": prompt, "chosen": extend(c), "rejected": extend(r)}
            for key, text in row.items():
                totals[key] += len(text)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if args.progress and (i + 1) % args.progress == 0:
                print(f"{i + 1} pairs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    tmp.replace(out)
    n = max(args.pairs, 1)
    meta = {
        "file": str(out), "pairs": args.pairs, "bytes": out.stat().st_size, "seed": args.seed,
        "source": str(args.hh_file), "min_chars": args.min_chars, "max_chars": args.max_chars,
        "mean_chars": {k: round(v / n, 1) for k, v in totals.items()},
        "mean_completion_chars": round((totals["chosen"] + totals["rejected"]) / (2 * n), 1),
        "generate_s": round(time.perf_counter() - start, 1),
        "command": _command("generate", ["--pairs", str(args.pairs), "--out", str(out), "--seed",
                                         str(args.seed), "--min-chars", str(args.min_chars), "--max-chars",
                                         str(args.max_chars)]),
    }
    if out.suffix == ".gz":
        meta["uncompressed_bytes"] = _gz_size(out)
    meta_path(out).write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


def _gz_size(path: Path) -> int:
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += len(chunk)
    return n


def meta_path(file: Path) -> Path:
    return file.with_name(file.name + ".meta.json")


def _command(sub: str, argv: list[str]) -> str:
    return shlex.join(["python", "benchmarks/bench_data.py", sub, *argv])
