"""Run by tests/test_sharded.py under torchrun: one DPO run; rank 0 prints its history as JSON.

argv: tmp_dir output_name per_process_batch reference [options...], options among
  lora          LoRA adapters (the ``adapter`` reference)
  save:K        a checkpoint every K steps
  kill:K        the last process SIGKILLs itself after step K (torchrun then stops the job)
  resume        resume: true
  steps:N       max_steps (default 4)
  accum:K       gradient_accumulation_steps
  ckpt:MODE     gradient_checkpointing (full, selective, off)
  loss:NAME     the loss (default sigmoid)
  vlm           the tiny image-text model (tmp_dir/vlm) on pairs with images (tmp_dir/image_pairs.jsonl)
The engine (DDP, or FSDP2 through accelerate's ``ACCELERATE_USE_FSDP``) comes from the environment."""

import json
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import apply_test_cpu_linear, base_config  # noqa: E402
from preftune.methods.dpo import train_dpo  # noqa: E402

apply_test_cpu_linear()
logging.basicConfig(level=logging.INFO, format=f"rank{os.environ.get('RANK', '0')} %(message)s")

tmp, out, batch_size, reference = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
options = dict(o.partition(":")[::2] for o in sys.argv[5:])
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def kill_after(step: int):
    def callback(done: int, _row: dict) -> None:
        if done == step and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return callback


config = base_config(tmp, output_dir=str(tmp / out), batch_size=batch_size,
                     max_steps=int(options.get("steps", 4)), reference=reference,
                     lora=True if "lora" in options else None,
                     reference_cache_dir=str(tmp / "cache") if reference == "precomputed" else None,
                     save_steps=int(options["save"]) if "save" in options else None,
                     resume=True if "resume" in options else None,
                     gradient_accumulation_steps=int(options["accum"]) if "accum" in options else None,
                     gradient_checkpointing=options.get("ckpt"), loss=options.get("loss"))
if "vlm" in options:
    config.update(model=str(tmp / "vlm"), train_file=str(tmp / "image_pairs.jsonl"))
run = train_dpo(config, callbacks=[kill_after(int(options["kill"]))] if "kill" in options else ())
if run.train.final_dir is not None:
    print("HISTORY " + json.dumps(run.train.history))

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.destroy_process_group()
