"""Where a model comes from and whether it can be loaded: ``embedded``, a local directory or a hub
id resolved to a path, and a directory checked (config, safetensors headers and shards, tokenizer)
before anything loads, one line naming the key and the path when it cannot be."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from preftune.data.sources import HUB_ID

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "stories260k"




TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


T = TypeVar("T")


def resolve_model_path(name: str | None) -> str:
    """``None`` or ``"embedded"`` -> the bundled stories260K model; otherwise the path (or hub id,
    for users whose machines reach a hub)."""
    if name in (None, "", "embedded"):
        return str(EMBEDDED_MODEL)
    return str(name)


def check_model_path(key: str, name: str | None, *, tokenizer: bool = False, with_tokenizer: bool = False,
                     trust_remote_code: bool = False, label: str | None = None) -> None:
    """One line naming ``key`` (as ``label``, by default ``config: KEY``) when ``name`` is not a usable
    model directory, before anything loads: FileNotFoundError for what is missing (the directory,
    config.json, the weights, a shard, tokenizer files), ValueError for what is there but broken
    (a config transformers cannot read, a truncated or corrupt safetensors file, an unreadable tokenizer).

    A model directory needs a config.json that ``AutoConfig`` reads and safetensors weights whose
    headers match the file sizes (headers only: no tensor is read); ``with_tokenizer``: also a
    tokenizer (the run loads it from there); ``tokenizer``: only a tokenizer. ``"embedded"`` checks
    the bundled model; a hub id ``org/name`` that is not a local path is not checked (no network)."""
    if name in (None, ""):
        return
    label = label or f"config: {key}"
    path = Path(resolve_model_path(name))
    shown = str(path) if name == "embedded" else str(name).rstrip("/") or str(name)
    if path.is_dir():
        try:
            if tokenizer:
                tokenizer_problem(path, shown)
            else:
                model_dir_problem(path, shown, with_tokenizer=with_tokenizer,
                                  trust_remote_code=trust_remote_code)
        except BrokenModelDir as e:
            raise e.error(label) from None
        return
    if path.exists():
        raise FileNotFoundError(f"{label}: {name} is a file, not a model directory")
    if not HUB_ID.match(str(name)) or str(name).startswith((".", "~")):
        raise FileNotFoundError(f"{label}: no such model directory: {name}")


class BrokenModelDir(Exception):
    """What is wrong with a model directory, without the key (``missing``: a file is absent)."""

    def __init__(self, text: str, missing: bool = False):
        super().__init__(text)
        self.missing = missing

    def error(self, label: str) -> Exception:
        return (FileNotFoundError if self.missing else ValueError)(f"{label}: {self}")


SAFETENSORS_INDEX = "model.safetensors.index.json"


MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers


DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


AGAIN = "download or save it again"


def model_dir_problem(path: Path, shown: str, *, with_tokenizer: bool = False,
                      trust_remote_code: bool = False) -> None:
    """Raise :class:`BrokenModelDir` for the first thing that would stop ``path`` from loading."""
    config = path / "config.json"
    if not config.is_file():
        raise BrokenModelDir(f"{shown} is a directory without config.json; point it at a Hugging Face model "
                             "directory", missing=True)
    _read_json(config, f"{shown}/config.json", "fix it or save the model again")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # any reason transformers gives: one line of it
        raise BrokenModelDir(f"{shown}/config.json cannot be read by transformers ({first_line(e)}); "
                             "fix it or save the model again") from None
    weights_problem(path, shown)
    if with_tokenizer:
        tokenizer_problem(path, shown, beside_model=True)


def weights_problem(path: Path, shown: str) -> None:
    """Safetensors weights, as transformers looks for them with ``use_safetensors=True``:
    model.safetensors, else model.safetensors.index.json and every shard it lists, each with a header
    matching its size."""
    if (path / "model.safetensors").is_file():
        safetensors_header(path / "model.safetensors", f"{shown}/model.safetensors")
        return
    index = path / SAFETENSORS_INDEX
    if not index.is_file():
        binary = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (path / n).is_file()]
        if binary:
            raise BrokenModelDir(f"{shown} holds {binary[0]} but no model.safetensors; preftune loads "
                                 "safetensors weights only: convert it (from_pretrained, then "
                                 "save_pretrained with safe_serialization=True)", missing=True)
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if shards:
            raise BrokenModelDir(f"{shown} holds {shards[0]} but neither model.safetensors nor "
                                 f"{SAFETENSORS_INDEX}; download or save the model again", missing=True)
        raise BrokenModelDir(f"{shown} has config.json but no weights (no model.safetensors or "
                             f"{SAFETENSORS_INDEX}); download or save the model again", missing=True)
    data = _read_json(index, f"{shown}/{SAFETENSORS_INDEX}", AGAIN)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())):
        raise BrokenModelDir(f"{shown}/{SAFETENSORS_INDEX} is corrupt (no weight_map of tensor names to "
                             f"shard files); {AGAIN}")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    absent = [shard for shard in shards if not (path / shard).is_file()]
    if absent:
        raise BrokenModelDir(f"{shown}/{absent[0]} is missing ({SAFETENSORS_INDEX} lists {len(shards)} "
                             f"shards, {len(absent)} absent); download or save the model again", missing=True)
    for shard, tensors in shards.items():
        header = safetensors_header(path / shard, f"{shown}/{shard}")
        lacking = [t for t in tensors if t not in header]
        if lacking:
            more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
            raise BrokenModelDir(f"{shown}/{shard} lacks tensor {lacking[0]!r}{more} that "
                                 f"{SAFETENSORS_INDEX} places in it; download or save the model again")


def safetensors_header(file: Path, shown: str) -> dict[str, Any]:
    """The tensors of a safetensors file's header, after checking (as safetensors does when it opens
    the file) that the header parses and its tensors tile exactly the bytes after it; no tensor is read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BrokenModelDir(f"{shown} is truncated ({size} bytes, less than its 8-byte header length); "
                                 f"{AGAIN}")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            if head.startswith(b"version "):
                raise BrokenModelDir(f"{shown} is a Git LFS pointer, not the weights; fetch it with "
                                     "git lfs pull or download it again")
            raise BrokenModelDir(f"{shown} is not a safetensors file (its first 8 bytes give a header of "
                                 f"{n:,} bytes); {AGAIN}")
        if 8 + n > size:
            raise BrokenModelDir(f"{shown} is truncated (its header is {n:,} bytes, the file holds "
                                 f"{size - 8:,} after the header length); {AGAIN}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BrokenModelDir(f"{shown} has a corrupt header (not valid JSON: {first_line(e)}); "
                             f"{AGAIN}") from None
    if not isinstance(header, dict):
        raise BrokenModelDir(f"{shown} has a corrupt header (not a JSON object); {AGAIN}")
    header.pop("__metadata__", None)
    spans = []
    for tensor, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape, dtype = list(info["shape"]), info["dtype"]
            ok = all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise BrokenModelDir(f"{shown} has a corrupt header (tensor {tensor!r} has no valid dtype, "
                                 f"shape and data_offsets); {AGAIN}")
        width = DTYPE_BYTES.get(dtype)
        if width is not None and math.prod(shape) * width != end - begin:
            raise BrokenModelDir(f"{shown} has a corrupt header (tensor {tensor!r}, {dtype} {shape}, needs "
                                 f"{math.prod(shape) * width:,} bytes but its offsets span "
                                 f"{end - begin:,}); {AGAIN}")
        spans.append((begin, end, tensor))
    covered = 0
    for begin, end, tensor in sorted(spans):
        if begin != covered:
            raise BrokenModelDir(f"{shown} has a corrupt header (tensor {tensor!r} starts at byte {begin:,} "
                                 f"of the data, not {covered:,}); {AGAIN}")
        covered = end
    held = size - 8 - n
    if covered > held:
        raise BrokenModelDir(f"{shown} is truncated (header says {covered:,} bytes of tensors, the file "
                             f"holds {held:,}); {AGAIN}")
    if covered < held:
        raise BrokenModelDir(f"{shown} is corrupt ({held - covered:,} bytes after the {covered:,} bytes of "
                             f"tensors its header lists); {AGAIN}")
    return header


def tokenizer_problem(path: Path, shown: str, *, beside_model: bool = False) -> None:
    """Raise :class:`BrokenModelDir` when ``path`` has no tokenizer files or one that cannot be read
    (tokenizer.json parsed by ``tokenizers``, the JSON files parsed)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        fix = "save the tokenizer beside the model or set tokenizer" if beside_model else \
            "point it at a Hugging Face model directory"
        raise BrokenModelDir(f"{shown} is a directory without tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)}); {fix}", missing=True)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception
            raise BrokenModelDir(f"{shown}/tokenizer.json cannot be read as a tokenizer ({first_line(e)}); "
                                 "save the tokenizer again") from None
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        if (path / name).is_file():
            _read_json(path / name, f"{shown}/{name}", "save the tokenizer again")


def _read_json(file: Path, shown: str, fix: str) -> Any:
    try:
        return json.loads(file.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BrokenModelDir(f"{shown} is not valid JSON ({first_line(e)}); {fix}") from None


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its first sentence when that line is long)."""
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    if len(line) > limit and ". " in line[:limit]:
        line = line[: line.index(". ") + 1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def explain_failure(key: str, name: str | None, error: Exception, **check: Any) -> None:
    """After ``error`` loading ``name``: raise the one line :func:`check_model_path` gives for the
    directory (labelled ``key``), if it finds what is wrong; else return (the caller re-raises)."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return
    try:
        check_model_path(key, str(path), label=key, **check)
    except (FileNotFoundError, ValueError) as found:
        raise found from error


def from_hub_or_path(key: str, name: str, load: Callable[[], T]) -> T:
    """``load()``; a hub id that cannot be fetched (offline, unknown, gated) becomes one line naming
    ``key``."""
    try:
        return load()
    except OSError as e:
        if Path(name).exists():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"config: {key}: {name} is not a local directory and could not be loaded "
                                f"from the Hugging Face hub ({first})") from e
