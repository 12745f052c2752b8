"""Quiet by default: transformers/peft messages that are expected in preftune are silenced where
they arise; anything else is shown, and preftune's own advice is given once per process."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

logger = logging.getLogger("preftune")
_said: set[str] = set()


def no_hub_bars() -> None:
    """transformers' per-file "Loading weights" / "Writing model shards" bars off (our own progress stays)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def expected_load_report() -> Iterator[None]:
    """Hide transformers' load-report table while loading a checkpoint whose missing keys the caller
    expects (and checks itself), e.g. a fresh reward head."""
    # the load report, and the tensor-parallel plan check that a sequence-classification head (not in
    # the causal LM's plan) trips on every load although nothing is sharded on one process
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils",
                                                    "transformers.distributed.tensor_parallel")]
    levels = [hf.level for hf in loggers]
    for hf in loggers:
        hf.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for hf, level in zip(loggers, levels):
            hf.setLevel(level)


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """peft asks transformers >= 5 for the deprecated ``is_gradient_checkpointing``; that FutureWarning
    is peft's, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def say_once(key: str, message: str, *args: object) -> bool:
    """``logger.warning(message, *args)`` the first time ``key`` is seen in this process."""
    if key in _said:
        return False
    _said.add(key)
    logger.warning(message, *args)
    return True
