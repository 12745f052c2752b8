"""cpu_allocator: which glibc setting each case resolves to, and that the settings do what they say."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from preftune.engine.config import TrainConfig
from preftune.hardware import allocator

needs_glibc = pytest.mark.skipif(allocator.glibc() is None, reason="cpu_allocator tunes glibc malloc (Linux)")

PROBE = """
import sys, torch
from preftune.hardware import allocator
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
allocator.apply(sys.argv[1])
kept = []
for mib in (8, 8, 100):
    before = rss_mib()
    t = torch.ones(mib * 2**20 // 4)
    del t
    kept.append(round(rss_mib() - before))
print(*kept)
"""


def retained_after_free(setting: str) -> list[int]:
    """MiB of RSS a fresh process keeps after allocating and freeing 8, 8 and 100 MiB under ``setting``."""
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@needs_glibc
def test_settings_change_what_happens_to_freed_memory():
    system, fast, lean = (retained_after_free(s) for s in ("system", "fast", "lean"))
    assert system[2] < 4, system  # glibc maps blocks over 32 MiB and unmaps them at free
    assert system[1] > 6, system  # ... but keeps a second 8 MiB block (its threshold rose past it)
    assert fast[2] > 90, fast  # fast: the 100 MiB stay in the heap for the next step
    assert max(lean) < 4, lean  # lean: every block over 1 MiB goes back at once


@needs_glibc
@pytest.mark.parametrize(("setting", "device", "chosen"), [
    ("auto", "cpu", "fast"),
    ("auto", "cuda", "system"),
    ("system", "cpu", "system"),
    ("lean", "cpu", "lean"),
    ("fast", "cpu", "fast"),
])
def test_resolve(setting, device, chosen):
    assert allocator.resolve(setting, device)[0] == chosen


def test_explicit_settings_that_cannot_apply_are_errors(monkeypatch):
    with pytest.raises(ValueError,
                       match="cpu_allocator: fast tunes the CPU allocator, but training runs on cuda"):
        allocator.resolve("fast", "cuda")
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    with pytest.raises(ValueError, match="cpu_allocator: lean needs glibc"):
        allocator.resolve("lean", "cpu")
    assert allocator.resolve("auto", "cpu") == ("system", "not glibc")


def test_config_rejects_unknown_setting():
    with pytest.raises(ValueError, match="cpu_allocator must be auto, fast, lean, system, got 'quick'"):
        TrainConfig(train_file="x.jsonl", cpu_allocator="quick")


@needs_glibc
@pytest.mark.parametrize(("overrides", "line"), [
    ({}, "cpu allocator auto -> fast (freed memory kept for reuse; lean: the lowest peak, slower)"),
    ({"cpu_allocator": "lean"}, "cpu allocator lean (as configured)"),
    ({"cpu_allocator": "system"}, "cpu allocator system (as configured)"),
])
def test_loading_the_policy_states_the_choice_in_one_line(tmp_path, caplog, overrides, line):
    from helpers import base_config, save_tiny_model
    from preftune.engine.config import build_config
    from preftune.engine.setup import load_policy
    from preftune.hardware import process_owned
    from preftune.methods.dpo import DPOConfig

    save_tiny_model(tmp_path / "model")
    config = build_config(DPOConfig, base_config(tmp_path, **overrides))
    try:
        with caplog.at_level(logging.INFO, logger="preftune"), process_owned():  # as under the CLI
            load_policy(config)
    finally:
        allocator.apply("fast")  # leave this test process as the default leaves a CPU run
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("cpu allocator")] == [line]
