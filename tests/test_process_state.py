"""A library call leaves the process as it found it: ``preftune.train_dpo(...)`` with the defaults
sets no environment variable, calls no ``mallopt``, swaps no layer class, leaves torch's threads and
default dtype, the logging set-up and the signal handlers alone. The CLI (which owns its process)
may choose the hardware settings ``auto`` stands for; so may a config that names them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import base_config

PROBE = r"""
import json, logging, os, signal, sys
sys.path.insert(0, sys.argv[2])
import torch
from preftune.hardware import allocator

calls = []
libc = allocator.glibc()
if libc is not None:  # every mallopt the run makes is recorded (and still made)
    real = libc.mallopt
    libc.mallopt = lambda *args: calls.append(args) or real(*args)

def state():
    return {"env": dict(os.environ), "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()),
            "handlers": [repr(h) for h in logging.getLogger().handlers],
            "root_level": logging.getLogger().level,
            "signals": [repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)],
            "linear_forward": repr(torch.nn.Linear.forward)}

before = state()
config = json.loads(sys.argv[1])
if config.pop("cli", False):
    from preftune.cli import main
    args = ["dpo"] + [f"--{k}={v}" for k, v in config.items()]
    assert main(args) == 0
else:
    import preftune
    preftune.train_dpo(config)
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
if "env" in changed:
    changed["env"] = sorted(set(after["env"].items()) ^ set(before["env"].items()))
print("RESULT " + json.dumps({"changed": changed, "mallopt": len(calls)}))
"""


def probe(config: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_a_library_call_with_the_defaults_leaves_the_process_as_it_found_it(tmp_path):
    result = probe(base_config(tmp_path, max_steps=2, batch_size=4))
    assert result == {"changed": {}, "mallopt": 0}


def test_settings_a_config_names_are_applied(tmp_path):
    from preftune.hardware import allocator

    if allocator.glibc() is None:
        pytest.skip("cpu_allocator: lean tunes glibc's malloc; this C library is not glibc")

    result = probe(base_config(tmp_path, max_steps=1, batch_size=4, cpu_allocator="lean", cpu_linear="torch"))
    assert result["mallopt"] == 2  # lean's mmap and trim thresholds


@pytest.mark.skipif(sys.platform != "linux", reason="the allocator choice tunes glibc")
def test_the_cli_may_choose_what_auto_stands_for(tmp_path):
    from preftune.hardware import allocator

    if allocator.glibc() is None:
        pytest.skip("auto changes glibc's malloc only where there is glibc")
    config = {k: v for k, v in base_config(tmp_path, max_steps=1, batch_size=4).items()
              if k != "reference_cache_dir"}
    result = probe({**config, "cli": True})
    assert result["mallopt"] == 2  # cpu_allocator auto -> fast: the mmap and trim thresholds

