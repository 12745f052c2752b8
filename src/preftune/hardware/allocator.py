"""How the CPU memory allocator (glibc malloc) treats a training step's large tensors.

glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with fresh pages from the
kernel and returns them when the block is freed. A CPU training step allocates and frees its large
activations (``[tokens, ffn]`` MLP states, their gradients) every layer, so with glibc's defaults
each one is faulted in and zeroed by the kernel again: an elementwise op into a fresh 50 MB tensor
ran ~3x slower than into reused memory on the benchmark machine, and a profiled long-completion
DPO step took 15% longer for it (``benchmarks/SHAPES.md``). ``cpu_allocator`` picks the trade-off:

* ``fast``: freed memory stays in the heap for reuse (mmap threshold 1 GiB, trim threshold 2 GiB):
  no page faults once the heap has grown. Faster than glibc's settings and, in the benchmarks, no
  higher a peak (3.73 against 3.98 GiB for a 134M model with full checkpointing).
* ``lean``: every block over 1 MiB goes back to the kernel when freed (threshold 1 MiB, trim
  threshold 0): the lowest peak (2.62 GiB in the same run) for steps 1.2-1.7x slower, since
  every large tensor is faulted in again.
* ``system``: glibc's own settings, untouched.
* ``auto`` (default): ``fast`` when training on the CPU with glibc, else ``system`` (a GPU's
  memory has its own caching allocator).

The settings are process-wide (``mallopt``) and last until the process exits; ``auto`` applies
``fast`` only when the CLI owns the process (:mod:`preftune.hardware`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

ALLOCATOR_SETTINGS = ("auto", "fast", "lean", "system")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MIB = 2**20
SETTINGS = {  # (mmap threshold, trim threshold) in bytes; mallopt takes a C int
    "fast": (1024 * MIB, 2**31 - 1),
    "lean": (1 * MIB, 0),
}


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def resolve(setting: str, device_type: str, *, process_owned: bool = True) -> tuple[str, str]:
    """(the setting to apply, why) for ``cpu_allocator: setting``; raises ValueError where an
    explicit ``fast`` / ``lean`` cannot apply. ``auto`` changes nothing unless ``process_owned`` (the
    CLI runs: see :mod:`preftune.hardware`)."""
    if setting in ("fast", "lean"):
        if device_type != "cpu":
            raise ValueError(f"config: cpu_allocator: {setting} tunes the CPU allocator, but training runs "
                             f"on {device_type}; use auto or system")
        if glibc() is None:
            raise ValueError(f"config: cpu_allocator: {setting} needs glibc (Linux); this C library is "
                             f"{platform.libc_ver()[0] or 'unknown'}: use auto or system")
        return setting, "as configured"
    if setting == "system":
        return "system", "as configured"
    if device_type != "cpu":
        return "system", f"training on {device_type}"
    if not process_owned:
        return "system", ("a library call leaves the process's malloc as it found it; "
                          "cpu_allocator: fast sets it")
    if glibc() is None:
        return "system", "not glibc"
    return "fast", "freed memory kept for reuse; lean: the lowest peak, slower"


def apply(setting: str) -> None:
    """Set glibc's mmap and trim thresholds for ``fast`` or ``lean``; ``system`` does nothing."""
    if setting == "system":
        return
    libc = glibc()
    mmap_threshold, trim_threshold = SETTINGS[setting]
    if libc is None or not (libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
                            and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)):
        raise RuntimeError(f"cpu_allocator: {setting}: mallopt refused the thresholds")


def configure(setting: str, device_type: str, *, process_owned: bool = True) -> str:
    """Resolve and apply ``cpu_allocator``; returns the one log line that states the choice."""
    chosen, why = resolve(setting, device_type, process_owned=process_owned)
    apply(chosen)
    shown = f"{setting} -> {chosen}" if setting == "auto" else chosen
    return f"cpu allocator {shown} ({why})"
