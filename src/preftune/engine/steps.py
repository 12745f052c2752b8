"""Step sources: which micro-batches make optimizer step ``s``. :class:`DatasetSteps` serves a fixed
dataset in epoch-wise seeded permutations, split over processes, then into micro-batches; PPO's
rollouts are another source (``methods/ppo_rollout.py``). The loop (``loop.py``) asks a source for a
step and knows nothing else of the data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from preftune.data.tokenize import TokenizedPair, fingerprint_of
from preftune.engine.config import TrainConfig


def step_indices(num_items: int, global_batch: int, seed: int, step: int) -> list[int]:
    """Dataset positions of optimizer step ``step``: epoch-wise seeded permutations, in order."""
    per_epoch = math.ceil(num_items / global_batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * global_batch : (k + 1) * global_batch].tolist()


def step_plan(config: TrainConfig, num_items: int, num_processes: int) -> tuple[int, int]:
    """(pairs per optimizer step over all processes, optimizer steps in the run)."""
    global_batch = config.batch_size * config.gradient_accumulation_steps * num_processes
    per_epoch = math.ceil(num_items / global_batch)
    return global_batch, config.max_steps or max(1, math.ceil(config.epochs * per_epoch))


@dataclass
class StepBatches:
    """This process's micro-batches of one optimizer step, the units of the whole step (over all
    processes) and step-level metrics (e.g. PPO's rollout statistics), averaged like the others."""

    batches: list[Any]
    units: float
    metrics: dict[str, float] = field(default_factory=dict)


class StepSource(Protocol):
    """Which micro-batches make optimizer step ``step``. A batch has ``.to(device)`` and
    ``.num_real_tokens``."""

    #: what one item is called in the start-of-run summary ("pairs", "examples", ...)
    noun: str

    @property
    def num_items(self) -> int | None:
        """Items in one pass over the data (the summary's epochs); None where the data is not a
        fixed set (PPO samples its rollouts as it goes)."""
        ...

    def fingerprint(self) -> str | None:
        """A hash of the data: the run identity's ``train_data`` (None: ``train_file`` stands for it)."""
        ...

    def total_steps(self, num_processes: int) -> int: ...

    def step(self, step: int, process_index: int, num_processes: int) -> StepBatches: ...

    def state_dict(self) -> dict[str, Any] | None:
        """The source's state, saved in each checkpoint as ``steps_state.pt``; None: it has none."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave, on resume."""
        ...


def one_per_pair(pair: TokenizedPair) -> float:
    return 1.0


class DatasetSteps:
    """Optimizer step ``s`` of a fixed dataset: the ``s``-th slice of epoch-wise seeded
    permutations (:func:`step_indices`), split over processes, then into micro-batches. ``noun``:
    the summary's word for an item (default: ``pairs``, or ``examples`` for rows without a
    rejected side, as SFT's)."""

    def __init__(self, config: TrainConfig, pairs: Sequence[TokenizedPair],
                 collate: Callable[[Sequence[TokenizedPair], Sequence[int]], Any],
                 units: Callable[[TokenizedPair], float] = one_per_pair, index_offset: int = 0,
                 noun: str | None = None):
        self.config, self.pairs, self.collate, self.units = config, pairs, collate, units
        # added to dataset positions (e.g. eval rows of a reference cache)
        self.index_offset = index_offset
        self.noun = noun or ("pairs" if not pairs or pairs[0].rejected_ids else "examples")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_items(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """A hash of the tokenized data: the run identity's ``train_data``."""
        return fingerprint_of(self.pairs)

    def state_dict(self) -> None:
        """None: step ``s`` depends on ``s`` and the config alone."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""

    def batch(self, indices: Sequence[int]) -> Any:
        return self.collate([self.pairs[j] for j in indices], [self.index_offset + j for j in indices])

    def total_steps(self, num_processes: int) -> int:
        return step_plan(self.config, len(self.pairs), num_processes)[1]

    def step(self, step: int, process_index: int, num_processes: int) -> StepBatches:
        global_batch = step_plan(self.config, len(self.pairs), num_processes)[0]
        idx = step_indices(len(self.pairs), global_batch, self.config.seed, step)
        share = math.ceil(len(idx) / num_processes)
        mine = idx[process_index * share : (process_index + 1) * share]
        b = self.config.batch_size
        return StepBatches([self.batch(mine[i : i + b]) for i in range(0, len(mine), b)],
                           sum(self.units(self.pairs[j]) for j in idx))

    def in_order(self, batch_size: int | None = None) -> Iterator[tuple[Any, float]]:
        """(batch, units) over the whole dataset in order, ``batch_size`` items each (evaluation)."""
        b = batch_size or self.config.batch_size
        for start in range(0, len(self.pairs), b):
            indices = range(start, min(start + b, len(self.pairs)))
            yield self.batch(indices), sum(self.units(self.pairs[j]) for j in indices)
