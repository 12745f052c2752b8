"""Two machines, simulated: two ``torchrun`` launchers of one process each (``--nnodes 2``) meet at a c10d
rendezvous on this machine and train as one job. The result equals two processes on one node: the same
global batch, the same gradients averaged over the same ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from helpers import assert_weights_close, save_tiny_model, write_pairs
from test_distributed import WORKER, launch_two


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(tmp_path: Path, output: str) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint HOST:PORT`` twice, as one
    would type it on each of two machines (here both on 127.0.0.1)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    endpoint = f"127.0.0.1:{free_port()}"
    command = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", endpoint, "--rdzv_id", "preftune-test", str(WORKER), str(tmp_path), output,
               "4", "model"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ.copy())
             for _ in range(2)]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, node.returncode, out, err))
    return results


def test_two_nodes_of_one_process_equal_two_processes_on_one_node(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "train.jsonl")
    one_node = launch_two(tmp_path, "model")  # writes tmp_path/two
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    nodes = launch_two_nodes(tmp_path, "nodes")
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    histories = [json.loads(line[len("HISTORY "):]) for node in nodes for line in node.stdout.splitlines()
                 if line.startswith("HISTORY ")]
    assert len(histories) == 1  # the job's one main process (global rank 0) reports and writes final/
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    across = load_file(str(tmp_path / "nodes" / "final" / "model.safetensors"))
    assert_weights_close(two, across, lr=1e-3)  # base_config's learning rate
