"""Test session set-up: caches the library writes by default go to a temporary folder, not ~/.cache."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="preftune-test-cache-")


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
