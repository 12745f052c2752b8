"""Two CPU processes (torch.distributed, gloo, through accelerate) equal one process with the same
global batch."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import base_config, save_tiny_model, write_pairs
from preftune.train.dpo import train_dpo

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_two_processes_match_one(tmp_path, reference):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "train.jsonl")
    cache = str(tmp_path / "cache") if reference == "precomputed" else None
    single = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "one"), batch_size=8, max_steps=3,
                                   reference=reference, reference_cache_dir=cache))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER),
         str(tmp_path), "two", "4", reference],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("HISTORY ")]
    history = json.loads(line[len("HISTORY "):])
    for a, b in zip(single.train.history, history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"])
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=0)
