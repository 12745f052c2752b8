"""Online methods across processes: each process samples and judges its share of a round (the sampler's
batches, so together they draw the samples one process draws), every process trains on the whole
round, and two processes equal one with the same global batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from helpers import assert_weights_close

WORKER = Path(__file__).with_name("online_worker.py")


def run(tmp_path: Path, output: str, method: str, processes: int, batch: int, ok: bool = True) -> list[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
         str(port), str(WORKER), str(tmp_path), output, method, str(batch)],
        # one thread in every process (torchrun sets it only for several): the same kernels, the same sums
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc.stdout.splitlines() + proc.stderr.splitlines()


def result(tmp_path: Path, output: str) -> dict:
    # a file, not stdout: a long line of one process may be split by another's writes to the shared pipe
    return json.loads((tmp_path / f"{output}.result.json").read_text())


def judged(lines: list[str]) -> dict[int, int]:
    # the processes' lines may interleave on the shared stdout: read the pattern, not the lines
    return {int(rank): int(n) for rank, n in re.findall(r"JUDGED (\d+) (\d+)", "\n".join(lines))}


def test_ppo_on_two_processes_equals_one(tmp_path):
    one = run(tmp_path, "one", "ppo", processes=1, batch=8)
    two = run(tmp_path, "two", "ppo", processes=2, batch=4)  # minibatches of 8 either way
    # 24 prompts, the sampler's batches of 16 and 8: process 0 draws and judges the first, process 1
    # the second
    assert judged(one) == {0: 24} and judged(two) == {0: 16, 1: 8}
    a, b = result(tmp_path, "one")["history"], result(tmp_path, "two")["history"]
    assert a[0]["env/reward"] == b[0]["env/reward"]  # the same round: the same samples, the same rewards
    assert a[0]["objective/kl"] == b[0]["objective/kl"] == 0.0
    assert_weights_close(load_file(str(tmp_path / "one" / "final" / "model.safetensors")),
                         load_file(str(tmp_path / "two" / "final" / "model.safetensors")), lr=3e-3)


def test_iterative_dpo_on_two_processes_equals_one(tmp_path):
    one = run(tmp_path, "one", "iterate", processes=1, batch=8)
    two = run(tmp_path, "two", "iterate", processes=2, batch=4)
    # 24 prompts x 4 samples, the sampler's batches of 16 and 8 prompts: 64 and 32 completions judged
    assert judged(one) == {0: 96} and judged(two) == {0: 64, 1: 32}
    for name in ("samples.jsonl", "pairs.jsonl"):  # written once, by the main process: the same round
        texts = [(tmp_path / run_dir / "round_1" / name).read_text() for run_dir in ("one", "two")]
        assert texts[0] == texts[1]
    a, b = result(tmp_path, "one")["rounds"][0], result(tmp_path, "two")["rounds"][0]
    assert (a["pairs"], a["mean_judge_score"], a["sample_tokens"]) == (b["pairs"], b["mean_judge_score"],
                                                                       b["sample_tokens"])
    weights = [load_file(str(tmp_path / d / "round_1" / "final" / "model.safetensors"))
               for d in ("one", "two")]
    assert_weights_close(*weights, lr=3e-3)


def test_iterative_dpo_on_image_prompts_on_two_processes_equals_one(tmp_path):
    """Prompts with images: each process samples its share (each image encoded once per batch), the judge
    gets the images, and the round's files and weights are those of one process."""
    from preftune.lab.shapes import make_examples, write_dataset
    from preftune.lab.vision_model import build_tiny_vlm

    build_tiny_vlm(tmp_path / "vlm", seed=0)
    write_dataset(make_examples(24, 1), tmp_path / "data", name="prompts", kind="prompts")
    one = run(tmp_path, "one", "iterate-images", processes=1, batch=8)
    two = run(tmp_path, "two", "iterate-images", processes=2, batch=4)
    assert judged(one) == {0: 96} and judged(two) == {0: 64, 1: 32}
    for name in ("samples.jsonl", "pairs.jsonl"):
        texts = [(tmp_path / run_dir / "round_1" / name).read_text() for run_dir in ("one", "two")]
        assert texts[0] == texts[1] and '"images": ["/' in texts[0]
    weights = [load_file(str(tmp_path / d / "round_1" / "final" / "model.safetensors"))
               for d in ("one", "two")]
    assert_weights_close(*weights, lr=1e-3)


def test_a_judge_failing_on_one_process_stops_every_process(tmp_path):
    """The failing process raises its error; the others raise naming it, instead of waiting for its share."""
    lines = "\n".join(run(tmp_path, "fail", "ppo-fail", processes=2, batch=4, ok=False))
    assert "RuntimeError: the judge of process 1 broke" in lines
    assert "another process of the run failed: RuntimeError: the judge of process 1 broke" in lines
