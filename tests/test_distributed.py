"""Two CPU processes (torch.distributed, gloo, through accelerate) equal one process with the same
global batch: DDP, and FSDP2 (preftune's fully_shard, engine/sharding.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import (
    LOSS_RTOL,
    assert_weights_close,
    base_config,
    save_tiny_model,
    tensorboard_scalars,
    write_pairs,
)
from preftune.methods.dpo import train_dpo

WORKER = Path(__file__).with_name("distributed_worker.py")


# what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets in each process's environment
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def launch_two(tmp_path: Path, reference: str, *extra: str, env: dict[str, str] | None = None):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(WORKER), str(tmp_path), "two", "4", reference, *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_one_process_tokenizes_the_other_reads_the_cache(tmp_path):
    """Under two processes the local main process tokenizes the data into the cache while the other
    waits, then reads that entry: one tokenization per machine, not one per process."""
    cache = tmp_path / "xdg-cache"  # empty: nothing tokenized before this run
    proc = launch_two(tmp_path, "model", env={"XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_cache = [line for line in proc.stderr.splitlines() if "tokenized pairs from the cache" in line]
    assert [line.split()[0] for line in from_cache] == ["rank1"], proc.stderr[-3000:]
    assert len(list((cache / "preftune" / "tokenized").iterdir())) == 1  # one entry, no build left behind


def run_single(tmp_path: Path, reference: str, lora: bool = False):
    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "train.jsonl")
    cache = str(tmp_path / "cache") if reference == "precomputed" else None
    return train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "one"), batch_size=8, max_steps=3,
                                 reference=reference, reference_cache_dir=cache, lora=lora or None))


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_two_processes_match_one(tmp_path, reference):
    single = run_single(tmp_path, reference)
    report = {"PREFTUNE_TEST_REPORT_TO": "tensorboard"} if reference == "model" else {}
    proc = launch_two(tmp_path, reference, env=report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compare(tmp_path, single, proc)
    if report:  # the tracker runs on the main process only: one writer, every logged row once
        board = tmp_path / "two" / "tensorboard"
        assert len(list(board.glob("events.out.tfevents.*"))) == 1
        rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
        logged = tensorboard_scalars(board)["loss"]
        assert logged == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r})


@pytest.mark.parametrize("reference,lora", [("model", False), ("precomputed", False), ("adapter", True)])
def test_fsdp_full_shard_matches_one_process(tmp_path, reference, lora):
    """FSDP2 on two gloo processes (preftune's own fully_shard: engine/sharding.py) gives one process's
    weights at the same global batch; the frozen reference of ``model`` is sharded too."""
    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "train.jsonl")
    proc = launch_two(tmp_path, reference, *(["lora"] if lora else []), env=FSDP_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank0 sharding: FSDP2 over 2 processes" in proc.stderr  # sharded, not a silent DDP
    compare(tmp_path, run_single(tmp_path, reference, lora), proc)


def compare(tmp_path: Path, single, proc) -> None:
    """Two processes of 4 pairs (gradients all-reduced) against one of 8: other batches, other sums
    and another process, so close (helpers' tolerances), not equal."""
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("HISTORY ")]
    history = json.loads(line[len("HISTORY "):])
    for a, b in zip(single.train.history, history):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        # at step 1 the policy is the reference: every margin is 0 up to rounding, its sign noise
        if a["step"] > 1:
            assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"])  # k / 8 positive margins
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert_weights_close(one, two, lr=1e-3)  # base_config's learning rate
