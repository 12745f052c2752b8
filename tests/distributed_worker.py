"""Run by tests/test_distributed.py under torchrun: one DPO run, rank 0 prints its history as JSON.

argv: tmp_dir output_name per_process_batch reference [lora]. The engine (DDP by default, FSDP through
accelerate's ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables) comes from the environment, as with
``accelerate launch --config_file``; ``PREFTUNE_TEST_REPORT_TO`` sets report_to."""

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import apply_test_cpu_linear, base_config  # noqa: E402
from preftune.methods.dpo import train_dpo  # noqa: E402

apply_test_cpu_linear()  # PREFTUNE_TEST_CPU_LINEAR, as in the test session that launched it
# every process's log lines on stderr, each with its rank (which process tokenized, which read the cache)
logging.basicConfig(level=logging.INFO, format=f"rank{os.environ.get('RANK', '0')} %(message)s")

tmp, out, batch_size, reference = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
lora = len(sys.argv) > 5 and sys.argv[5] == "lora"
run = train_dpo(base_config(tmp, output_dir=str(tmp / out), batch_size=batch_size, max_steps=3,
                            reference=reference,
                            reference_cache_dir=str(tmp / "cache") if reference == "precomputed" else None,
                            lora=lora or None, report_to=os.environ.get("PREFTUNE_TEST_REPORT_TO")))
if run.train.final_dir is not None:
    print("HISTORY " + json.dumps(run.train.history))

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():  # a clean shutdown: gloo's threads stopped before the interpreter exits
    dist.destroy_process_group()
