"""Pieces every benchmark script shares: package versions and the machine's CPU and memory."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence

PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "pyarrow", "preftune")


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python's and each package's installed version ("not installed" where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name (lscpu), else what ``platform`` knows."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
