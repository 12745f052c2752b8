"""Run configuration: typed dataclasses, read from YAML (``yaml.safe_load``) plus ``--key value``
overrides. Unknown keys are an error with a suggestion; values are checked before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from preftune.data.batching import LAYOUTS
from preftune.data.sources import Source
from preftune.engine.trackers import tracker_names
from preftune.hardware.allocator import ALLOCATOR_SETTINGS
from preftune.hardware.cpu_linear import CPU_LINEAR_SETTINGS

C = TypeVar("C", bound="TrainConfig")


logger = logging.getLogger("preftune")

@dataclass
class TrainConfig:
    """Settings every objective shares: data, model, optimisation, logging, checkpoints."""

    # data
    train_file: str | list[str] | None = None
    # a dataset repository (a hub id, or a directory laid out as one) given as train_file / eval_file:
    dataset_config: str | None = None  # its config (default: the repository's)
    train_split: str | None = None  # the split to train on (default: train)
    eval_split: str | None = None  # a split to evaluate on: of eval_file, else of train_file
    eval_file: str | list[str] | None = None
    skip_bad_rows: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None
    # tokenized data cache (default ~/.cache/preftune/tokenized; data/pipeline.py)
    data_cache_dir: str | None = None
    # model
    model: str = "embedded"
    tokenizer: str | None = None
    # Jinja text or a file holding it, for tokenizers that have none (as in TRL)
    chat_template: str | None = None
    trust_remote_code: bool = False
    disable_dropout: bool = True
    # "auto": the fastest of off, selective, full whose activations fit the memory budget (one log line);
    # true / "full": each decoder layer recomputed in backward (least memory, one more forward);
    # "selective": matmul outputs kept, only elementwise ops recomputed; false / "off": nothing recomputed
    gradient_checkpointing: bool | str = "auto"
    compile: bool = False  # torch.compile the norms and dense MLPs of each decoder layer (model/fusion.py)
    # auto's (and off's output layer's) budget (default: 0.8 x free memory less optimizer state)
    memory_budget_gib: float | None = None
    # glibc malloc on CPU: fast (reuse freed memory; auto), lean, system (hardware/allocator.py)
    cpu_allocator: str = "auto"
    # fp32 linear layers on CPU: onednn (auto on x86), torch (hardware/cpu_linear.py)
    cpu_linear: str = "auto"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # image-text models: the language model's linear layers
    lora_target_modules: list[str] | str = "all-linear"
    lora_projector: bool = False  # image-text models: LoRA on the image projector too
    # batching: layout of the forward pass (see preftune.data.batching); exact in every case
    layout: str = "prefix_shared"
    pack_length: int | None = None
    logit_chunk_size: int = 256  # scored positions per output-layer chunk: bounds the [chunk, vocab] logits
    # optimisation
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 5e-6
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    # each tensor's update in backward, its gradient freed (engine/optimizer.py)
    optimizer_in_backward: bool = False
    precision: str = "fp32"
    seed: int = 0
    # output
    output_dir: str = "runs/preftune"
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_on_start: bool = False  # evaluate before the first step (a row with step 0)
    eval_batch_size: int | None = None  # pairs per evaluation batch (None: batch_size)
    run_name: str | None = None  # a name shown in the logs and stored in metrics.jsonl and the run identity
    save_steps: int | None = None
    save_total_limit: int | None = None  # keep the newest N checkpoints (None: all)
    save_final: bool = True
    # experiment trackers (accelerate's): a name or a list of tensorboard, wandb, mlflow, trackio, aim,
    # comet_ml, clearml, swanlab, dvclive; all (the installed ones) or none (engine/trackers.py)
    report_to: str | list[str] = "none"
    project: str | None = None  # the trackers' project (mlflow: experiment); None: "preftune"
    progress_bar: bool = True
    resume: bool = False  # continue the run in output_dir (only the same run: see preftune.engine.faults)
    overwrite: bool = False  # replace another run's files in output_dir (refused without it)
    max_bad_steps: int = 3  # non-finite steps in a row (each skipped) that stop the run

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on values that cannot work, naming the key."""
        self._check_values()
        tracker_names(self.report_to)  # a known tracker, and installed
        self._fit_prompt_budget()
        if self.train_file is None:
            raise ValueError("config: train_file is required")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("config: set max_steps or epochs > 0")
        if self.optimizer_in_backward and self.max_grad_norm:
            raise ValueError("config: optimizer_in_backward updates each tensor during backward, before the "
                             "global gradient norm is known: set max_grad_norm: null (no clipping)")
        if self.optimizer_in_backward and self.gradient_accumulation_steps > 1:
            raise ValueError("config: optimizer_in_backward updates each tensor as its gradient is ready, so "
                             "it cannot accumulate gradients: set gradient_accumulation_steps: 1")
        if self.resume and self.overwrite:
            raise ValueError("config: resume and overwrite exclude each other: continue the run or "
                             "replace it")
        if self.layout == "padded" and self.pack_length is not None:
            raise ValueError("config: pack_length has no effect with layout 'padded'; remove it")
        if not self.lora:
            self.no_effect(("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_projector"),
                           "without lora: true")
        if not self.eval_file and not self.eval_split:
            self.no_effect(("eval_steps",), "without eval_file")
        if self.warmup_steps:
            self.no_effect(("warmup_ratio",), "beside warmup_steps (warmup_steps wins)")
        if self.optimizer == "rmsprop":
            self.no_effect(("adam_betas",), "with optimizer: rmsprop")
        if self.compile and self.checkpointing_mode == "selective":
            raise ValueError("config: compile: true does not combine with gradient_checkpointing: selective; "
                             "use auto, full or off")
        # the budget serves auto, and off (whether the output layer keeps its probabilities)
        if self.checkpointing_mode not in ("auto", "off"):
            shown = str(self.gradient_checkpointing).lower()
            self.no_effect(("memory_budget_gib",),
                           f"with gradient_checkpointing: {shown} (only with auto or off)")

    def _fit_prompt_budget(self) -> None:
        """A default ``max_prompt_length`` follows a smaller ``max_length`` the user set (half of it, one
        log line); two budgets that conflict are an error only when the user set both."""
        max_length, max_prompt = self.max_length, self.max_prompt_length
        if max_length is None or max_prompt is None or max_prompt < max_length:
            return
        if max_prompt != type(self).__dataclass_fields__["max_prompt_length"].default:
            raise ValueError(f"config: max_prompt_length {max_prompt} must be < max_length {max_length}")
        self.max_prompt_length = max(1, max_length // 2)
        logger.info("max_prompt_length %d: half of max_length %d (the default %d does not fit in it)",
                    self.max_prompt_length, max_length, max_prompt)

    def _check_values(self) -> None:
        """Each key's value on its own: one of the choices, or in range."""
        checks = {
            "layout": (self.layout in LAYOUTS, f"one of {', '.join(LAYOUTS)}"),
            "optimizer": (self.optimizer in ("adamw", "rmsprop"), "'adamw' or 'rmsprop'"),
            "lr_scheduler": (self.lr_scheduler in ("linear", "cosine", "constant"),
                             "linear, cosine or constant"),
            "precision": (self.precision in ("fp32", "bf16"), "'fp32' or 'bf16'"),
            "cpu_allocator": (self.cpu_allocator in ALLOCATOR_SETTINGS, ", ".join(ALLOCATOR_SETTINGS)),
            "cpu_linear": (self.cpu_linear in CPU_LINEAR_SETTINGS, ", ".join(CPU_LINEAR_SETTINGS)),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, ">= 1"),
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "warmup_ratio": (0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            "logging_steps": (self.logging_steps >= 1, ">= 1"),
            "eval_batch_size": (self.eval_batch_size is None or self.eval_batch_size >= 1, ">= 1 or null"),
            "logit_chunk_size": (self.logit_chunk_size >= 1, ">= 1"),
            "adam_betas": (len(self.adam_betas) == 2, "two numbers"),
            "max_bad_steps": (self.max_bad_steps >= 1, ">= 1"),
            "save_total_limit": (self.save_total_limit is None or self.save_total_limit >= 1, ">= 1 or null"),
        }
        checks["gradient_checkpointing"] = (
            self.gradient_checkpointing in ("auto", True, False, "full", "selective", "off"),
            "'auto', 'full', 'selective', 'off', true or false")
        checks["memory_budget_gib"] = (self.memory_budget_gib is None or self.memory_budget_gib > 0,
                                       "> 0 or null")
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"config: {key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def checkpointing_mode(self) -> str:
        """``gradient_checkpointing`` as a mode of :func:`preftune.model.checkpointing.enable_checkpointing`,
        or ``"auto"`` (resolved from the memory budget by :func:`preftune.engine.setup.load_policy`)."""
        value = self.gradient_checkpointing
        return {True: "full", False: "off"}[value] if isinstance(value, bool) else value

    def no_effect(self, keys: tuple[str, ...], why: str) -> None:
        """Refuse a key set away from its default where this config makes it inert (the README's promise)."""
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in keys and getattr(self, f.name) != default:
                raise ValueError(f"config: {f.name} has no effect {why}; remove it")

    @property
    def train_files(self) -> list[str]:
        return [self.train_file] if isinstance(self.train_file, str) else list(self.train_file or [])

    @property
    def eval_files(self) -> list[str]:
        return [self.eval_file] if isinstance(self.eval_file, str) else list(self.eval_file or [])

    @property
    def train_sources(self) -> list[Source]:
        """What to train on: each train file, or the ``train_split`` of a dataset repository."""
        return [Source(f, self.train_split, self.dataset_config) for f in self.train_files]

    @property
    def eval_sources(self) -> list[Source]:
        """What to evaluate on: each eval file, or ``eval_split`` of the eval (else the train) repository."""
        files = self.eval_files or (self.train_files if self.eval_split else [])
        return [Source(f, self.eval_split, self.dataset_config) for f in files]


def check_ranges(config: Any, checks: dict[str, bool]) -> None:
    """``checks``: key -> whether the config's value is in range; the first key out of range is a
    ValueError naming it and its value."""
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"config: {key} out of range: {getattr(config, key)!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert: int -> float) a value against a field's type hint."""
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if is_union else (hint,)
    if value is None and type(None) in options:
        return None
    for opt in options:
        base = typing.get_origin(opt) or opt
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _number_or(value, value) is not value:
            return float(value)  # YAML 1.1 reads 5e-4 (no dot) as text
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"config: {name} must be {names}, got {value!r}")


def check_keys(cls: type, values: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """TRL names replaced by their preftune settings (one notice each, :mod:`preftune.engine.trl_names`);
    other unknown keys are an error naming ``source`` with a 'did you mean' suggestion."""
    from preftune.engine.trl_names import translate

    fields = {f.name for f in dataclasses.fields(cls)}
    values = translate(values, fields, cls_name=cls.__name__, source=source)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown key {key!r}{hint}")
    return values


def build_config(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
    """Make ``cls`` from a dict; TRL names are translated, unknown keys get a 'did you mean' suggestion."""
    values = check_keys(cls, values, source=source)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(key, value, hints[key])
    return cls(**kwargs)  # __post_init__ validates


def _number_or(value: Any, raw: str) -> Any:
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; read it as the number the user meant."""
    if isinstance(value, str):
        try:
            return float(raw) if raw.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--beta", "0.2", "--lora", "true"]`` -> ``{"beta": 0.2, "lora": True}`` (values as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:  # --key=value: only the key's dashes are underscores (a value keeps its own)
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        try:
            value = _number_or(yaml.safe_load(raw), raw)
        except yaml.YAMLError as e:
            raise ValueError(f"--{key}: {raw!r} is not a valid YAML value: {yaml_problem(e)}") from e
        *heads, last = key.split(".")  # --loss_params.beta 0.2, --dpo.loss_params.beta 0.2
        node = out
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read YAML (safe_load) at ``path``, apply ``--key value`` overrides, validate."""
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:  # missing, a directory, unreadable
            raise FileNotFoundError(f"--config {path}: {e.strerror or e}") from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid YAML: {yaml_problem(e)}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of key: value")
        values.update(check_keys(cls, loaded, source=source))
    cli = check_keys(cls, parse_overrides(overrides or []), source="command line")
    source = source if not cli else f"{source} + command line"
    return build_config(cls, merge_settings(values, cli), source=source)


def yaml_problem(error: Exception) -> str:
    """A YAML (or decoding) error in one line: what is wrong and where."""
    if isinstance(error, UnicodeDecodeError):
        return f"bytes that are not UTF-8 at byte {error.start}"
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or str(error).splitlines()[0]}{where}"


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of ``base``; nested mappings merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if both else value
    return out
