"""Test session set-up: caches the library writes by default go to a temporary folder, not ~/.cache;
``PREFTUNE_TEST_CPU_LINEAR=torch|onednn`` sets what ``cpu_linear: auto`` means for the session."""

from __future__ import annotations

import os
import tempfile

import pytest

from helpers import CPU_LINEAR_ENV, apply_test_cpu_linear

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="preftune-test-cache-")
#: e.g. ``PREFTUNE_TEST_CPU_LINEAR=torch pytest``: every run and model with cpu_linear auto (the default)
#: takes PyTorch's linear layers instead of oneDNN's; worker scripts apply the same (helpers.py)
TEST_CPU_LINEAR = apply_test_cpu_linear()


def pytest_report_header(config):
    if TEST_CPU_LINEAR:
        return f"cpu_linear: auto -> {TEST_CPU_LINEAR} ({CPU_LINEAR_ENV})"
    return None


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored afterwards: the lab's setting (far faster for the tiny
    models on a busy machine) and what worker processes use, so in-process and child runs are
    bit-identical. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def own_cpu_linear_auto(monkeypatch):
    """``cpu_linear: auto`` as the library resolves it, whatever ``PREFTUNE_TEST_CPU_LINEAR`` says: for
    the tests of that resolution itself."""
    from preftune.hardware import cpu_linear

    monkeypatch.setattr(cpu_linear, "resolve", getattr(cpu_linear.resolve, "__wrapped__", cpu_linear.resolve))
