"""One DPO run in a child process for tests/test_faults.py, which can die or be stopped on cue.

usage: fault_worker.py CONFIG_JSON [CUE]

CUE (steps count from 1):
  precompute:K   SIGKILL itself while the reference precompute pass scores its K-th batch
  cache-write    SIGKILL itself halfway through writing the reference cache entry
  step:K         SIGKILL itself inside step K, after its backward pass, before its update
  save:K         SIGKILL itself while checkpoint-K is written (model and optimizer in, the rest not)
  metrics:K      SIGKILL itself halfway through writing the metrics row of step K
  final          SIGKILL itself when the final model is written, before it is renamed into place
  sigterm:K      send itself SIGTERM inside step K (sigint:K: SIGINT)
  fsize:K        from step K on, no file may grow past 40 kB (RLIMIT_FSIZE, SIGXFSZ ignored): a full disk

Prints ``HISTORY <json>`` when the run completes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(cue: str) -> None:
    """Patch the library so that the process dies (or is signalled) at ``cue``."""
    import preftune.methods.dpo as dpo
    import preftune.model.reference as reference
    from preftune.engine import loop
    from preftune.engine.metrics_log import MetricsLog

    kind, _, arg = cue.partition(":")
    at = int(arg) if arg else 0
    if kind == "precompute":
        original = dpo.precompute_reference

        def precompute(score, *args, **kwargs):
            calls = []

            def counting(batch):
                calls.append(1)
                if len(calls) == at:
                    die()
                return score(batch)

            return original(counting, *args, **kwargs)

        dpo.precompute_reference = precompute
    elif kind == "cache-write":
        from safetensors.torch import save

        def half_written(tensors, path, metadata=None):
            data = save(tensors, metadata=metadata)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            die()

        reference.save_file = half_written
    elif kind in ("step", "sigterm", "sigint", "fsize"):
        original_step = loop.Trainer._train_step

        def train_step(self, module, step):
            out = original_step(self, module, step)
            if step + 1 == at:
                if kind == "step":
                    die()
                elif kind == "fsize":
                    import resource

                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, hard_limit))
                else:
                    os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
            return out

        loop.Trainer._train_step = train_step
    elif kind == "save":
        original_save = torch.save

        def save_then_die(obj, f, *args, **kwargs):
            path = Path(f)
            if path.name == "scheduler.pt" and path.parent.name.startswith(f".tmp-checkpoint-{at}-"):
                die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save_then_die
    elif kind == "metrics":
        original_write = MetricsLog.write

        def write(self, row):
            if row.get("step") == at and "loss" in row and self.file is not None:
                line = json.dumps(row)
                self.file.write(line[: len(line) // 2])
                self.file.flush()
                die()
            original_write(self, row)

        MetricsLog.write = write
    elif kind == "final":
        original_write_atomically = loop.write_atomically

        def written_then_die(target, fill):
            return original_write_atomically(target, lambda tmp: (fill(tmp), die()))

        loop.write_atomically = written_then_die
    else:
        raise SystemExit(f"unknown cue {cue!r}")


def main() -> None:
    from helpers import apply_test_cpu_linear

    torch.set_num_threads(1)  # as the test session's one_thread fixture: the same kernels, the same bits
    apply_test_cpu_linear()  # PREFTUNE_TEST_CPU_LINEAR, as in the test session that launched it
    config = json.loads(sys.argv[1])
    if len(sys.argv) > 2:
        install(sys.argv[2])
    from preftune.methods.dpo import train_dpo

    run = train_dpo(config)
    print("HISTORY " + json.dumps(run.train.history), flush=True)


if __name__ == "__main__":
    main()
