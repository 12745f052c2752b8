"""Setup shared by every objective: the run's start (:func:`prepare_run`: output directory,
accelerator, seed, tokenizer, data, collate function), the policy and frozen models, weight I/O."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from preftune.data.batching import ForwardBatch, collate
from preftune.data.formats import plural
from preftune.data.images import ImageInputs
from preftune.data.pipeline import TokenizedFiles, tokenize_files
from preftune.data.sources import Source
from preftune.data.tokenize import Budgets, TokenizedData, TokenizedPair
from preftune.engine.accelerator import local_main_process_first, make_accelerator, training_device
from preftune.engine.config import TrainConfig
from preftune.engine.faults import check_output_dir
from preftune.engine.steps import DatasetSteps, one_per_pair
from preftune.hardware import configure_cpu
from preftune.model.checkpointing import (
    GIB,
    activation_bytes,
    auto_line,
    choose_mode,
    enable_checkpointing,
    head_line,
    head_probs_bytes,
    memory_budget,
    text_config,
)
from preftune.model.fusion import compile_layers, compiler_missing
from preftune.model.hub import check_model_path, from_hub_or_path, resolve_model_path
from preftune.model.load import apply_lora, disable_dropout, load_model, load_tokenizer
from preftune.model.logps import SequenceScorer
from preftune.model.vision import is_vision_config, load_image_inputs, vision_lora_targets

logger = logging.getLogger("preftune")
#: ``collate(pairs, dataset positions) -> ForwardBatch`` in the configured layout (:func:`make_collate`)
Collate = Callable[[Sequence[TokenizedPair], Sequence[int]], ForwardBatch]


@dataclass
class DataBundle:
    """Tokenized train/eval data and what was left out on the way: ``skipped_rows`` holds the
    messages of skipped bad rows, train's then eval's (the last ``eval_skipped`` of them)."""

    train: TokenizedData
    eval: TokenizedData | None
    skipped_rows: list[str] = field(default_factory=list)
    eval_skipped: int = 0
    kind: str = "paired"

    def summary(self) -> str:
        """One line, train then eval: how many pairs, and how many rows skipped, pairs dropped (per
        reason), pairs truncated and completions empty (EOS alone)."""
        noun = "pair" if self.kind == "paired" else "example"
        parts = [self._describe(f"training {noun}", self.train, len(self.skipped_rows) - self.eval_skipped)]
        if self.eval is not None:
            parts.append(self._describe(f"eval {noun}", self.eval, self.eval_skipped))
        return "; ".join(parts)

    @staticmethod
    def _describe(what: str, data: TokenizedData, skipped: int) -> str:
        notes = [f"{plural(skipped, 'bad row')} skipped"] if skipped else []
        notes += [f"{n} dropped as {reason}" for reason, n in data.drops().items()]
        if data.truncated:
            notes.append(f"{data.truncated} truncated")
        if data.empty_completions:
            notes.append(f"{plural(data.empty_completions, 'empty completion')} trained as EOS alone")
        return plural(len(data.pairs), what) + (f" ({', '.join(notes)})" if notes else "")


def load_policy(config: TrainConfig) -> nn.Module:
    """The trainable causal LM: dropout off (by default), checkpointing and LoRA as configured;
    ``gradient_checkpointing: auto`` resolved here from the memory budget, ``cpu_allocator`` and
    ``cpu_linear``, in one log line each."""
    model = load_model(config.model, trust_remote_code=config.trust_remote_code)
    if config.disable_dropout:
        disable_dropout(model)
    mode, keep_head_probs = plan_checkpointing(config, model)
    enable_checkpointing(model, mode, keep_head_probs)  # the model states both: checkpointing_mode(model)
    for line in configure_cpu(model, linear=config.cpu_linear, allocator_setting=config.cpu_allocator,
                              device_type=training_device().type):  # before LoRA wraps the layers
        logger.info(line)
    if config.lora:
        targets = config.lora_target_modules
        if is_vision_config(model.config) and targets == "all-linear":  # the language model (+ projector)
            targets = vision_lora_targets(model, projector=config.lora_projector)
        elif config.lora_projector:
            raise ValueError("config: lora_projector needs an image-text model with the default "
                             "lora_target_modules (all-linear)")
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=targets)
    if config.compile:
        missing = compiler_missing(training_device())
        if missing:
            raise ValueError(missing)
        if not compile_layers(model):
            raise ValueError(f"compile: true found no decoder layers to compile in {config.model}")
    return model


def load_frozen(name: str, config: TrainConfig) -> nn.Module:
    """A separate frozen model (a reference), its linear layers as ``cpu_linear`` says (stated once,
    by :func:`load_policy`)."""
    model = load_model(name, trust_remote_code=config.trust_remote_code)
    configure_cpu(model, linear=config.cpu_linear, allocator_setting=None, device_type=training_device().type)
    return model


def plan_checkpointing(config: TrainConfig, model: nn.Module) -> tuple[str, bool]:
    """(the decoder's checkpointing mode, whether the output layer keeps its probabilities).

    ``gradient_checkpointing: auto`` takes the fastest mode whose activations fit the memory budget
    (:mod:`preftune.model.checkpointing`). With ``off``, chosen or configured, the output layer keeps
    its ``[scored positions, vocab]`` fp32 probabilities for backward where they fit the budget
    beside the activations, instead of recomputing its logits there. One log line per choice.
    """
    if config.checkpointing_mode in ("full", "selective"):  # as configured; the head recomputes
        return config.checkpointing_mode, False
    # the largest forward with gradients: one micro-batch, 2 x batch_size sequences of <= max_length
    length = config.max_length or getattr(text_config(model), "max_position_embeddings", None) or 0
    positions = 2 * config.batch_size * max(length, config.pack_length or 0)
    bf16 = config.precision == "bf16"
    estimates = activation_bytes(model, positions, dtype_bytes=next(model.parameters()).element_size(),
                                 compute_bytes=2 if bf16 else None)
    if config.compile:  # selective checkpointing does not see inside compiled regions
        estimates.pop("selective")
    if not positions:
        budget, source = None, "max_length is null and the model states no max_position_embeddings"
    elif config.memory_budget_gib is not None:
        budget, source = int(config.memory_budget_gib * GIB), "memory_budget_gib"
    else:
        device = training_device()
        budget = memory_budget(model, device, optimizer_states=2 if config.optimizer == "adamw" else 1,
                               lora_rank=config.lora_r if config.lora else None, autocast_bf16=bf16)
        source = (f"0.8 x (free {device.type} memory - gradients - optimizer state)" if budget is not None
                  else f"free {device.type} memory is unknown")
    mode = config.checkpointing_mode
    if mode == "auto":
        mode = choose_mode(estimates, budget)
        logger.info(auto_line(mode, estimates, budget, source))
        if mode != "off":
            return mode, False
    probs = head_probs_bytes(model, positions)
    keep = budget is not None and estimates["off"] + probs <= budget
    logger.info(head_line(keep, probs, estimates["off"], budget))
    return mode, keep


def load_run_images(config: TrainConfig, tokenizer: Any) -> ImageInputs | None:
    """The model's image inputs (its processor, sharing the run's tokenizer), or None for a text model."""
    return load_image_inputs(config.model, tokenizer, trust_remote_code=config.trust_remote_code)


def load_run_tokenizer(config: TrainConfig) -> Any:
    """The run's first load: check every path the config names (one line each), fit ``max_length``
    to the model's positions, then the tokenizer with ``chat_template`` applied (saved with the model)."""
    check_run_paths(config)
    fit_max_length(config)
    template = read_chat_template(config.chat_template) if config.chat_template is not None else None
    return load_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code,
                          chat_template=template)


def check_run_paths(config: Any) -> None:
    """One line naming the key and the path, before anything loads, for a model, tokenizer, reference
    or reward model that is not a usable model directory (or a hub id ``org/name``; see
    :func:`~preftune.model.load.check_model_path`: missing or truncated safetensors weights, a config
    transformers cannot read, an unreadable tokenizer), a judge that names such a directory, and
    missing data files. ``config``: any run config (training, PPO, iterate) holding some of those keys."""
    from preftune.rewards.judges import check_reward_spec

    trust = bool(getattr(config, "trust_remote_code", False))
    tokenizer = getattr(config, "tokenizer", None)
    # the run's tokenizer comes from the model directory unless tokenizer is set; a reward model's from
    # its own
    for key, with_tokenizer in (("model", not tokenizer), ("reference_model", False), ("reward_model", True)):
        check_model_path(key, getattr(config, key, None), with_tokenizer=with_tokenizer,
                         trust_remote_code=trust)
    check_model_path("tokenizer", tokenizer, tokenizer=True)
    dpo = getattr(config, "dpo", None)  # iterate's DPO settings
    if isinstance(dpo, dict) and isinstance(dpo.get("tokenizer"), str):
        check_model_path("dpo.tokenizer", dpo["tokenizer"], tokenizer=True)
    for key in ("judge", "eval_reward", "reward_fn"):  # rewards that may name a reward model directory
        value = getattr(config, key, None)
        if isinstance(value, str):
            check_reward_spec(value, f"config: {key}", trust_remote_code=trust)
    for key in ("train_file", "eval_file"):
        value = getattr(config, key, None)
        for name in [value] if isinstance(value, str) else list(value or []):
            # "-": rows given from Python; a hub id is read (or refused in one line) when the data loads
            if name != "-" and not Path(name).exists() and not Source(name).is_repository():
                raise FileNotFoundError(f"config: {key}: no such file or directory: {name}")


def read_chat_template(value: str) -> str:
    """``chat_template``: the Jinja text itself (it has ``{{`` or ``{%``) or a file holding it."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config: chat_template: no such file: {value} "
                                "(give a file or the Jinja text)")
    return path.read_text(encoding="utf-8")


def fit_max_length(config: TrainConfig) -> None:
    """A ``max_length`` the user set above the model's ``max_position_embeddings`` is an error; the
    default is capped to it with one log line (and the default ``max_prompt_length`` to half of it)."""
    from transformers import AutoConfig

    if config.max_length is None:
        return
    path = resolve_model_path(config.model)
    model_config = from_hub_or_path("model", path, lambda: AutoConfig.from_pretrained(
        path, trust_remote_code=config.trust_remote_code))
    # image-text: the language model's
    positions = getattr(text_config(model_config), "max_position_embeddings", None)
    if not isinstance(positions, int) or config.max_length <= positions:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    if config.max_length != defaults["max_length"]:
        raise ValueError(f"config: max_length {config.max_length} exceeds the {positions} positions of "
                         f"model {config.model} (max_position_embeddings); set max_length <= {positions}")
    config.max_length = positions
    note = ""
    if config.max_prompt_length is not None and config.max_prompt_length >= positions:
        if config.max_prompt_length != defaults["max_prompt_length"]:
            raise ValueError(f"config: max_prompt_length {config.max_prompt_length} must be < max_length, "
                             f"which is capped to the model's {positions} positions; lower it")
        config.max_prompt_length = positions // 2
        note = f", max_prompt_length {config.max_prompt_length}"
    logger.info("max_length: %d, not the default %d: model %s has %d positions "
                "(max_position_embeddings)%s", positions, defaults["max_length"], config.model, positions,
                note)


def budgets(config: TrainConfig) -> Budgets:
    return Budgets(config.max_length, config.max_prompt_length, config.max_completion_length)


def load_data(config: TrainConfig, tokenizer: Any, kind: str = "paired",
              images: ImageInputs | None = None) -> DataBundle:
    """Read, validate and tokenize train (and eval) files for data of ``kind`` ("paired",
    "unpaired", "sft") into memory-mapped stores, streaming and cached (:mod:`preftune.data.pipeline`).
    Errors name file, row and field; a file of another kind says which columns the loss needs; train
    or eval files left with nothing to train on (every row skipped or dropped) give the count per
    reason and the first one. ``images``: the model's, for rows with images. Under several processes
    the local main process tokenizes and writes the cache first; the others then read it."""
    loss = getattr(config, "loss", None)
    purpose = f"loss {loss!r}" if loss is not None else "SFT" if kind == "sft" else "this run"

    def load(files: list[str]) -> TokenizedFiles:
        return tokenize_files(files, tokenizer, budgets(config), kind=kind,
                              skip_bad_rows=config.skip_bad_rows, purpose=purpose, images=images,
                              cache_dir=getattr(config, "data_cache_dir", None))

    if isinstance(config, TrainConfig):  # files, or splits of a dataset repository
        train_sources, eval_sources = config.train_sources, config.eval_sources
    else:  # a config-like object naming files only
        train_sources, eval_sources = config.train_files, config.eval_files
    with local_main_process_first():
        train = load(train_sources)
        evaluation = load(eval_sources) if eval_sources else None
    eval_skipped = evaluation.skipped if evaluation is not None else []
    bundle = DataBundle(train.data, evaluation.data if evaluation is not None else None,
                        train.skipped + eval_skipped, len(eval_skipped), kind)
    for message in bundle.skipped_rows:
        logger.warning("skipped: %s", message)
    for part in bundle.summary().split("; "):  # train, then eval, one line each
        logger.info("data: %s", part)
    return bundle


def make_collate(config: TrainConfig, pad_id: int, images: ImageInputs | None = None) -> Collate:
    """``collate(pairs, indices) -> ForwardBatch`` in the configured layout."""

    def fn(pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> ForwardBatch:
        return collate(pairs, indices, layout=config.layout, pack_length=config.pack_length, pad_id=pad_id,
                       images=images)

    return fn


@dataclass
class RunSetup:
    """What :func:`prepare_run` gives a method: the run's accelerator and tokenizer and, for a
    method that trains on a dataset, the model's image inputs, the data and its collate function."""

    config: TrainConfig
    accelerator: Accelerator
    tokenizer: Any
    images: ImageInputs | None = None  # None for a text model, or where not loaded
    data: DataBundle | None = None  # None where the method reads its own inputs (PPO's prompts)
    collate: Collate | None = None

    @property
    def saved_with(self) -> Any:
        """What the model directory gets beside the weights: the image processor, else the tokenizer."""
        return self.images.processor if self.images else self.tokenizer

    def dataset_steps(self, units: Callable[[TokenizedPair], float] = one_per_pair, *,
                      noun: str | None = None, eval_after_train: bool = False
                      ) -> tuple[DatasetSteps, DatasetSteps | None]:
        """(the training step source, the evaluation data or None without ``eval_file``), each item
        weighing ``units``. ``eval_after_train``: eval rows take the dataset positions after the
        training rows (as in a reference cache over both)."""
        if self.data is None or self.collate is None:
            raise RuntimeError("dataset_steps: this run was prepared without data (prepare_run(kind=None))")
        train, evaluation = self.data.train.pairs, self.data.eval
        offset = len(train) if eval_after_train else 0
        eval_steps = (DatasetSteps(self.config, evaluation.pairs, self.collate, units, index_offset=offset)
                      if evaluation else None)
        return DatasetSteps(self.config, train, self.collate, units, noun=noun), eval_steps


def prepare_run(config: TrainConfig, accelerator: Accelerator | None = None, *, kind: str | None = "paired",
                images: bool = True) -> RunSetup:
    """The start every method shares, in this order: refuse a used ``output_dir`` before anything
    loads, the accelerator (``accelerator`` or a new one), the seed, the tokenizer (after every path
    the config names is checked: :func:`load_run_tokenizer`); then, for training data of ``kind``
    ("paired", "unpaired", "sft"; None: the method reads its own inputs), the model's image inputs
    (with ``images``), the tokenized data (:func:`load_data`) and the collate function. The model
    (e.g. :func:`load_policy_scorer`), reference and objective are the method's own."""
    check_output_dir(config)
    accelerator = accelerator or make_accelerator(config)
    torch.manual_seed(config.seed)
    tokenizer = load_run_tokenizer(config)
    setup = RunSetup(config, accelerator, tokenizer)
    if kind is not None:
        setup.images = load_run_images(config, tokenizer) if images else None
        setup.data = load_data(config, tokenizer, kind=kind, images=setup.images)
        setup.collate = make_collate(config, tokenizer.pad_token_id, setup.images)
    return setup


def load_policy_scorer(config: TrainConfig) -> SequenceScorer:
    """The trainable policy (:func:`load_policy`) as a scorer of sequence log-probs, its output layer
    in chunks of ``logit_chunk_size`` positions."""
    return SequenceScorer(load_policy(config), config.logit_chunk_size)


def save_causal_lm(model: nn.Module, tokenizer: Any, directory: Path, *, merged: bool = True) -> None:
    """``save_pretrained`` (safetensors) + tokenizer; a PEFT model saves its adapter under
    ``adapter/`` and, with ``merged``, the merged weights at the top so plain transformers loads them."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory / "adapter", safe_serialization=True)
        if merged:
            import copy

            copy.deepcopy(model).merge_and_unload().save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


class CausalLMCheckpoints:
    """``save``/``load`` for objectives whose ``module`` wraps a causal LM as ``module.model``."""

    module: nn.Module
    tokenizer: Any

    def save(self, directory: Path) -> None:
        save_causal_lm(self.module.model, self.tokenizer, directory)

    def load(self, directory: Path) -> None:
        load_causal_lm_weights(self.module.model, directory)

    def frozen_modules(self) -> list[nn.Module]:
        """None here; an objective with a separate frozen model names it."""
        return []


def load_causal_lm_weights(model: nn.Module, directory: Path) -> None:
    """Load weights written by :func:`save_causal_lm` into ``model`` (in place, for resume)."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = load_file(str(directory / "adapter" / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, adapter)
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    if not set(state) <= set(model.state_dict()):
        # the file holds transformers' serialized key names (e.g. LLaVA's ``language_model.model.*``):
        # let transformers' own loader map them, then copy its tensors in
        saved = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype,
                                            use_safetensors=True)
        state = saved.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing
               if k not in tied and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match the model (missing {missing}, "
                         f"unexpected {unexpected})")

