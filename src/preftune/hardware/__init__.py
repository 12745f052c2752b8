"""Hardware-specific speed-ups: leaves at the bottom of the package that import no other preftune
folder, and that only the engine applies (``engine/setup.py`` through :func:`configure_cpu`); the
model code never names them (a swapped layer carries its own ``fp32_linear``, see ``model/logps.py``).

* ``cpu_linear.py``: oneDNN's fp32 kernels for linear layers on the CPU (``cpu_linear``);
* ``allocator.py``: glibc malloc thresholds for a CPU training step (``cpu_allocator``).

Both change the process (malloc settings, oneDNN's cache variables, module classes). They are
applied when the config names them (``onednn``, ``fast``, ``lean``), or for ``auto`` only while the
command line owns the process (:func:`process_owned`, entered by ``preftune``'s CLI): a library call
such as ``preftune.train_dpo(...)`` with the defaults leaves the process as it found it.

Layer rule: imports no other preftune folder; only the engine (which applies them) and the CLI (which
owns its process) import this folder. A new hardware speed-up is a new leaf here.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_OWNED = contextvars.ContextVar("preftune_process_owned", default=False)


@contextlib.contextmanager
def process_owned() -> Iterator[None]:
    """While inside, ``auto`` may choose process-wide settings: the CLI's run owns its process."""
    token = _OWNED.set(True)
    try:
        yield
    finally:
        _OWNED.reset(token)


def owns_process() -> bool:
    """Whether the running code is inside :func:`process_owned` (the CLI)."""
    return _OWNED.get()


def configure_cpu(model: Any, *, linear: str, allocator_setting: str | None, device_type: str) -> list[str]:
    """Resolve and apply ``cpu_allocator`` (unless None: a frozen model adds no allocator choice) and
    ``cpu_linear`` for ``model``; returns the log lines that state each choice."""
    from preftune.hardware import allocator, cpu_linear  # torch loads here, not for `preftune --help`

    owned = owns_process()
    lines = []
    if allocator_setting is not None:
        lines.append(allocator.configure(allocator_setting, device_type, process_owned=owned))
    lines.append(cpu_linear.configure(model, linear, device_type, process_owned=owned))
    return lines
