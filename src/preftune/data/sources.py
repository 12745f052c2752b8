"""Dataset repositories as row sources: a hub dataset id (``trl-lib/ultrafeedback_binarized``) or a
local directory laid out as a hub dataset repository (``data/train-00000-of-00001.parquet``, or
``README.md`` naming its configs), read with ``datasets.load_dataset`` as a stream, a ``split``
(default ``train``) of a ``config`` (default: the repository's).

A :class:`Source` names what to read; :func:`preftune.data.io.read_rows` takes one wherever it takes
a path. What cannot be loaded (no network, an unknown id, split or config) is one :class:`DataError`
naming the source and the split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as on the Hugging Face hub
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what datasets' save_to_disk writes


@dataclass(frozen=True)
class Source:
    """Where rows come from: ``path`` (a file, a saved dataset, a repository directory or a hub id)
    and, for a repository, its ``split`` and ``config``."""

    path: str
    split: str | None = None
    config: str | None = None

    def __str__(self) -> str:
        return self.path if self.split is None else f"{self.path} [{self.split}]"

    def is_repository(self) -> bool:
        """A hub id that is not a local path, or a directory that is not a saved dataset."""
        path = Path(self.path)
        if path.is_dir():
            return not any((path / name).exists() for name in SAVED_DATASET_FILES)
        return not path.exists() and bool(HUB_ID.match(self.path))


def as_source(item: str | Path | Source) -> Source:
    return item if isinstance(item, Source) else Source(str(item))


def read_repository(source: Source, row_type: Any, error_type: Any) -> Iterator[Any]:
    """The rows of a repository source, streamed: ``row_type(str(source), i, fields)`` from 1."""
    import datasets

    shown = str(source)
    try:
        # decode(False): an Image column stays {"bytes", "path"} (data/images.py), not PIL images
        rows = datasets.load_dataset(source.path, name=source.config, split=source.split or "train",
                                     streaming=True).decode(False)
        for i, fields in enumerate(rows, start=1):
            yield row_type(shown, i, fields)
    except error_type:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each is one line here
        what = ("a directory, but neither a saved dataset (save_to_disk) nor a dataset repository (data "
                "files under it, as on the hub)" if Path(source.path).is_dir()
                else "cannot be read as a dataset repository")
        raise error_type(shown, None, None, f"{what} ({_first_line(e)})" + _hint(source)) from None


def hub_fingerprint(source: Source, error_type: Any) -> str:
    """What identifies a hub dataset's data for the cache: the ``datasets`` builder's hash of its
    revision (from the network, or the cache offline)."""
    import datasets

    try:
        return datasets.load_dataset_builder(source.path, name=source.config).hash
    except Exception as e:  # noqa: BLE001
        raise error_type(str(source), None, None, f"cannot be read as a dataset repository "
                         f"({_first_line(e)})" + _hint(source)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _hint(source: Source) -> str:
    if Path(source.path).exists():
        return ""
    return ("; a hub id needs the network (or the datasets cache, with HF_DATASETS_OFFLINE=1); a local "
            "file or directory is read as is")
