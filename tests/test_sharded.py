"""FSDP2 on two CPU processes (gloo): the policy sharded per decoder layer and at the root, checkpoints
written by every process as torch.distributed.checkpoint shards, resumed exactly after a kill -9, and
one consolidated ``final/``. The equality of a sharded run with one process (full, LoRA, a reference
model, a precomputed reference) is tests/test_distributed.py's
``test_fsdp_full_shard_matches_one_process``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_weights_close, save_tiny_model, write_pairs
from preftune.engine.sharding import FullyShard, Replicated, make_sharding

WORKER = Path(__file__).with_name("sharded_worker.py")
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what `accelerate launch` sets from fsdp.yaml


def launch(tmp_path: Path, output: str, *options: str, processes: int = 2, batch: int = 4,
           env: dict[str, str] | None = None, reference: str = "model") -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run(
        [torchrun, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
         str(port), str(WORKER), str(tmp_path), output, str(batch), reference, *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, **FSDP2, **(env or {})})


def final_weights(tmp_path: Path, output: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / output / "final" / "model.safetensors"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    save_tiny_model(tmp_path / "model")
    write_pairs(tmp_path / "train.jsonl")
    return tmp_path


def test_each_process_writes_its_shards_and_final_is_one_directory(data):
    proc = launch(data, "run", "save:2", "steps:4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank0 sharding: FSDP2 over 2 processes" in proc.stderr
    shards = sorted((data / "run" / "checkpoint-2" / "sharded").glob("*.distcp"))
    assert [s.name for s in shards] == ["__0_0.distcp", "__1_0.distcp"]  # one file per process
    sizes = [s.stat().st_size for s in shards]
    assert max(sizes) < 1.5 * min(sizes)  # each holds about half of the weights and Adam's two moments
    assert not (data / "run" / "checkpoint-2" / "optimizer.pt").exists()  # it is in the shards
    from transformers import AutoModelForCausalLM

    # consolidated: plain transformers reads it
    model = AutoModelForCausalLM.from_pretrained(data / "run" / "final")
    final = final_weights(data, "run")
    assert {k for k, _ in model.named_parameters()} <= set(final) | {"lm_head.weight"}
    ddp = launch(data, "ddp", "save:2", "steps:4", env={"ACCELERATE_USE_FSDP": "false"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "sharding: FSDP2" not in ddp.stderr
    assert_weights_close(final_weights(data, "ddp"), final, lr=1e-3)  # the same arithmetic, other reductions


def test_kill_9_of_one_process_then_resume_is_exact(data):
    whole = launch(data, "whole", "save:2", "steps:4")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch(data, "cut", "save:2", "steps:4", "kill:3")
    assert killed.returncode != 0 and not (data / "cut" / "final").exists()
    resumed = launch(data, "cut", "save:2", "steps:4", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_weights(data, "whole"), final_weights(data, "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    logged = [[(row["step"], row["loss"]) for row in history(proc)] for proc in (whole, resumed)]
    # the resumed log continues
    assert logged[0] == logged[1] and [step for step, _ in logged[0]] == [1, 2, 3, 4]


def history(proc: subprocess.CompletedProcess) -> list[dict]:
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("HISTORY ")]
    return json.loads(line[len("HISTORY "):])


def test_a_sharded_checkpoint_resumes_with_another_number_of_processes(data):
    whole = launch(data, "whole", "save:2", "steps:4")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch(data, "cut", "save:2", "steps:4", "kill:3")
    assert killed.returncode != 0
    # one process of 8 pairs: the same global batch, so the same run (its identity holds the global batch)
    one = launch(data, "cut", "save:2", "steps:4", "resume", processes=1, batch=8)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "sharding: FSDP2" not in one.stderr  # one process: nothing to shard; the shards load unsharded
    assert_weights_close(final_weights(data, "whole"), final_weights(data, "cut"), lr=1e-3)
    other = launch(data, "cut", "save:2", "steps:4", "resume", processes=1, batch=4)  # half the global batch
    assert other.returncode != 0 and "belongs to a different run: global_batch 8 -> 4" in other.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "accelerate was asked for DeepSpeed but runs MULTI_CPU here"),
    ({**FSDP2, "FSDP_VERSION": "1"}, "asks for FSDP version 1; preftune shards with FSDP2"),
    ({**FSDP2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "set it to false"),
])
def test_what_cannot_run_is_refused_in_one_line(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    accelerator = SimpleNamespace(num_processes=2, distributed_type=SimpleNamespace(name="MULTI_CPU"))
    with pytest.raises(ValueError, match=message) as error:
        make_sharding(accelerator)
    assert "\n" not in str(error.value)


def test_one_process_or_no_request_is_not_sharded(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    one = SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="NO"))
    two = SimpleNamespace(num_processes=2, distributed_type=SimpleNamespace(name="MULTI_CPU"))
    assert isinstance(make_sharding(one), Replicated) and isinstance(make_sharding(two), FullyShard)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert isinstance(make_sharding(two), Replicated)


def test_the_precompute_is_split_over_processes_and_equals_one_process(data):
    """Each process scores every other micro-batch of the reference precompute (the same batches as one
    process), the values are joined and written once: the cache is bit for bit one process's."""
    from helpers import base_config
    from preftune.methods.dpo import train_dpo

    two = launch(data, "two", "steps:1", reference="precomputed", env={"ACCELERATE_USE_FSDP": "false"})
    assert two.returncode == 0, two.stderr[-3000:]
    # 32 pairs in micro-batches of 4: 8 batches, 4 on each process
    assert "rank0 reference: precomputing log-probs (4 of 8 batches on each process)" in two.stderr
    assert "rank1 reference: precomputing log-probs (4 of 8 batches on each process)" in two.stderr
    train_dpo(base_config(data, output_dir=str(data / "one"), batch_size=4, max_steps=1,
                          reference="precomputed", reference_cache_dir=str(data / "cache-one")))
    (shared,), (alone,) = (list((data / d).glob("ref-*.safetensors")) for d in ("cache", "cache-one"))
    a, b = load_file(str(shared)), load_file(str(alone))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unsharded_checkpoint_is_not_resumed_sharded(data):
    """A DDP checkpoint holds whole weights and an index-keyed optimizer state: an FSDP resume of it is
    refused in one line (resume it as it was written, or start anew)."""
    ddp = launch(data, "run", "save:2", "steps:4", "kill:3", env={"ACCELERATE_USE_FSDP": "false"})
    assert ddp.returncode != 0 and (data / "run" / "checkpoint-2" / "optimizer.pt").exists()
    sharded = launch(data, "run", "save:2", "steps:4", "resume")
    assert sharded.returncode != 0
    assert "checkpoint-2 was written by a run that did not shard (DDP or one process); resume it that way" \
        in sharded.stderr


@pytest.mark.parametrize(("loss", "checkpointing"), [("ipo", "full"), ("hinge", "selective")])
def test_accumulation_checkpointing_and_other_losses_shard_as_one_process(data, loss, checkpointing):
    """Two processes x 2 accumulated micro-batches of 2 pairs, with activation checkpointing and another
    loss, equal one process of 8 pairs per step."""
    from helpers import base_config
    from preftune.methods.dpo import train_dpo

    two = launch(data, "two", "steps:3", "accum:2", f"ckpt:{checkpointing}", f"loss:{loss}", batch=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank0 sharding: FSDP2 over 2 processes" in two.stderr
    train_dpo(base_config(data, output_dir=str(data / "one"), batch_size=8, max_steps=3, reference="model",
                          loss=loss))
    assert_weights_close(final_weights(data, "one"), final_weights(data, "two"), lr=1e-3)


def test_an_image_text_model_shards_as_one_process(tmp_path):
    """FSDP2 and DDP (which must find the vision tower's unread layers) of the tiny LLaVA on pairs with
    images equal one process with the same global batch."""
    import json

    from helpers import base_config
    from preftune.lab.shapes import make_examples, write_dataset
    from preftune.lab.vision_model import build_tiny_vlm
    from preftune.methods.dpo import train_dpo

    build_tiny_vlm(tmp_path / "vlm", seed=0)
    prompts = write_dataset(make_examples(16, 1), tmp_path, name="prompts", kind="prompts")
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    (tmp_path / "image_pairs.jsonl").write_text("".join(json.dumps(
        {**r, "chosen": [{"role": "assistant", "content": r["answer"]}],
         "rejected": [{"role": "assistant", "content": "grey"}]}) + "\n" for r in rows))
    two = launch(tmp_path, "two", "vlm", "steps:3")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank0 sharding: FSDP2 over 2 processes" in two.stderr
    ddp = launch(tmp_path, "ddp", "vlm", "steps:3", env={"ACCELERATE_USE_FSDP": "false"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train_dpo({**base_config(tmp_path, output_dir=str(tmp_path / "one"), batch_size=8, max_steps=3,
                             reference="model"),
               "model": str(tmp_path / "vlm"), "train_file": str(tmp_path / "image_pairs.jsonl")})
    one = final_weights(tmp_path, "one")
    assert_weights_close(one, final_weights(tmp_path, "two"), lr=1e-3)
    assert_weights_close(one, final_weights(tmp_path, "ddp"), lr=1e-3)
