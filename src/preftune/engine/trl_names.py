"""TRL's config names and what they are in preftune: a static table, applied by
:func:`preftune.engine.config.build_config` to YAML and command-line keys alike.

Walked from TRL 1.16.0 (``DPOConfig``, ``RewardConfig``, ``KTOConfig`` and the ``TrainingArguments``
fields users pass with them) plus the names of earlier 0.x releases still found in scripts
(``max_prompt_length``, ``rpo_alpha``, ...). Each name is one of:

* ``same``: the preftune key has the same name and meaning;
* ``alias``: renamed; the value is used as is under the preftune key (a notice says so);
* ``transform``: the value becomes other preftune settings (a notice says which);
* ``none``: no equivalent; the error says why and what to do instead.

``docs/trl.md`` is generated from this table (:func:`markdown_table`; a test keeps it in sync).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("preftune")
TRL_VERSION = "1.16.0"


@dataclass(frozen=True)
class TrlName:
    kind: str  # same | alias | transform | none
    target: str = ""  # the preftune key (alias, same) or what the transform sets (for the docs)
    note: str = ""  # for `none`: why, and what to do instead
    transform: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    example: Any = None  # a TRL value, for the tests' walk


def _same(example: Any) -> TrlName:
    return TrlName("same", example=example)


def _alias(target: str, example: Any) -> TrlName:
    return TrlName("alias", target, example=example)


def _none(note: str, example: Any = 1) -> TrlName:
    return TrlName("none", note=note, example=example)


def _loss(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    names = [value] if isinstance(value, str) else list(value)
    weights = values.get("loss_weights") or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} weights for {len(names)} loss_type names")
    if len(names) == 1 and float(weights[0]) == 1.0:
        return {"loss": names[0]}
    return {"loss": {n: float(w) for n, w in zip(names, weights)}}


def _loss_weights(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if "loss_type" not in values:
        raise ValueError("loss_weights needs loss_type beside it; in preftune write "
                         "loss: {sigmoid: 1.0, sft: 0.2}")
    return {}  # read by loss_type's transform


def _rpo(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    return {"loss": {"sigmoid": 1.0, "sft": float(value)}} if value else {}


def _precompute(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if value:
        return {"reference": "precomputed"}
    return {"reference": "adapter" if values.get("lora") or values.get("use_peft") else "model"}


def _scheduler(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    known = {"linear": "linear", "cosine": "cosine", "constant": "constant",
             "constant_with_warmup": "constant"}
    if value not in known:
        raise ValueError(f"lr_scheduler_type {value!r} has no preftune equivalent; lr_scheduler is linear, "
                         "cosine or constant (each after warmup_steps/warmup_ratio)")
    return {"lr_scheduler": known[value]}


def _optim(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if str(value).startswith("adamw"):
        return {"optimizer": "adamw"}
    if value == "rmsprop":
        return {"optimizer": "rmsprop"}
    raise ValueError(f"optim {value!r} has no preftune equivalent; optimizer is 'adamw' (fused) or 'rmsprop'")


def _resume(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, str):
        raise ValueError("resume_from_checkpoint: preftune resumes from the latest checkpoint of output_dir; "
                         "set resume: true and output_dir to that run")
    return {"resume": bool(value)}


def _eval_strategy(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if value in ("steps", "no"):
        return {} if value == "steps" else {"eval_steps": None}
    raise ValueError(f"eval_strategy {value!r}: preftune evaluates every eval_steps steps and at the end "
                     "(when eval_file is set); set eval_steps")


def _set(key: str, fn: Callable[[Any], Any]) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    return lambda value, values: {key: fn(value)}


def _t(target: str, fn: Callable[[Any, dict[str, Any]], dict[str, Any]], example: Any) -> TrlName:
    return TrlName("transform", target, transform=fn, example=example)


_DPO = {
    "learning_rate": _same(1e-6), "model_init_kwargs": _none(
        "models load with from_pretrained defaults; use trust_remote_code and precision",
        {"dtype": "bfloat16"}),
    "trust_remote_code": _same(True),
    "router_aux_loss_coef": _none("the MoE router's auxiliary loss is not added", 0.001),
    "disable_dropout": _same(True),
    "dataset_num_proc": _none("data is tokenized in one process (fast tokenizers batch it)", 4),
    "max_length": _same(512),
    "truncation_mode": _none("preftune cuts the prompt's start (BOS kept) and each completion's end, always",
                             "keep_start"),
    "padding_free": _t("layout", _set("layout", lambda v: "packed" if v else "padded"), True),
    "pad_to_multiple_of": _none("the prefix_shared and packed layouts need no padding", 8),
    "precompute_ref_log_probs": _t("reference", _precompute, True),
    "precompute_ref_batch_size": _none("the reference pass uses batch_size", 16),
    "loss_type": _t("loss", _loss, ["sigmoid"]),
    "loss_weights": _t("loss", _loss_weights, [1.0, 0.2]),
    "ld_alpha": _none("LD-DPO's length-desensitised weighting is not implemented", 0.5),
    "f_divergence_type": _none("f-DPO divergences other than reverse KL are not implemented",
                               "js_divergence"),
    "f_alpha_divergence_coef": _none("f-DPO divergences other than reverse KL are not implemented", 0.5),
    "label_smoothing": _alias("loss_params.label_smoothing", 0.1),
    "beta": _alias("loss_params.beta", 0.2),
    "use_weighting": _none("WPO weighting is not implemented", True),
    "discopop_tau": _alias("loss_params.discopop_tau", 0.05),
    "activation_offloading": _none("activations stay on the device; gradient_checkpointing bounds them",
                                   True),
    "sync_ref_model": _none("the reference is fixed (TR-DPO's reference updates are not implemented)", True),
    "ref_model_mixup_alpha": _none("the reference is fixed (TR-DPO is not implemented)", 0.6),
    "ref_model_sync_steps": _none("the reference is fixed (TR-DPO is not implemented)", 512),
    "pad_token": _none("the tokenizer's pad token (else EOS) pads; give tokenizer for another one", "<pad>"),
}
_REWARD = {
    "chat_template_path": _alias("chat_template", "template.jinja"),
    "eos_token": _none("the tokenizer's EOS ends every sequence; give tokenizer for another one",
                       "<|im_end|>"),
    "center_rewards_coefficient": _none("the auxiliary reward-centering loss is not implemented", 0.01),
}
_KTO = {
    "train_sampling_strategy": _none("steps are seeded epoch-wise permutations", "random"),
    "desirable_weight": _alias("loss_params.desirable_weight", 1.33),
    "undesirable_weight": _alias("loss_params.undesirable_weight", 1.0),
}
_BASE = {  # trl's _BaseConfig and TrainingArguments fields users pass with these configs
    "logging_steps": _same(10), "gradient_checkpointing": _same(False),
    "bf16": _t("precision", _set("precision", lambda v: "bf16" if v else "fp32"), True),
    "fp16": _none("fp16 autocast needs a loss scaler; use precision: bf16", True),
    "lr_scheduler_kwargs": _none("the schedules take no extra parameters", {"num_cycles": 2}),
    "use_liger_kernel": _none("the output layer is already chunked and fused with its backward", True),
    "torch_empty_cache_steps": _none("no cache emptying is needed", 10),
    "output_dir": _same("runs/x"), "overwrite_output_dir": _alias("overwrite", True),
    "per_device_train_batch_size": _alias("batch_size", 4),
    "per_device_eval_batch_size": _alias("eval_batch_size", 16),
    "gradient_accumulation_steps": _same(2), "num_train_epochs": _alias("epochs", 2.0),
    "max_steps": _same(20),
    "warmup_ratio": _same(0.1), "warmup_steps": _same(5), "weight_decay": _same(0.01),
    "lr_scheduler_type": _t("lr_scheduler", _scheduler, "cosine"),
    "optim": _t("optimizer", _optim, "adamw_torch"),
    "adam_beta1": _none("give both betas as adam_betas: [0.9, 0.999]", 0.9),
    "adam_beta2": _none("give both betas as adam_betas: [0.9, 0.999]", 0.999),
    "adam_epsilon": _none("AdamW uses torch's default eps (1e-8)", 1e-8),
    "max_grad_norm": _same(1.0), "seed": _same(1),
    "data_seed": _none("one seed orders the data and initialises everything; use seed", 3),
    "eval_strategy": _t("eval_steps", _eval_strategy, "steps"), "eval_steps": _same(50),
    "eval_on_start": _same(True),
    "save_strategy": _none("checkpoints are written every save_steps steps", "steps"),
    "save_steps": _same(100), "save_total_limit": _same(2), "save_only_model": _none(
        "checkpoints hold what an exact resume needs (optimizer, scheduler, data position)", True),
    "logging_strategy": _none("rows are logged every logging_steps steps", "steps"),
    "logging_first_step": _none("use eval_on_start for a step-0 point, or logging_steps: 1", True),
    "logging_dir": _none("metrics.jsonl and the trackers' local files are written under output_dir", "logs"),
    "report_to": _same(["tensorboard", "wandb"]), "run_name": _same("my-run"), "project": _same("my-project"),
    "disable_tqdm": _t("progress_bar", _set("progress_bar", lambda v: not v), True),
    "resume_from_checkpoint": _t("resume", _resume, True),
    "push_to_hub": _none("nothing is uploaded; output_dir/final is a Hugging Face directory to push", True),
    "hub_model_id": _none("nothing is uploaded", "me/model"),
    "dataloader_num_workers": _none("batches are built in the training process from tokenized data", 2),
    "remove_unused_columns": _none("rows are parsed by format; extra columns are ignored", False),
    "do_train": _none("every training command trains", True), "do_eval": _none("set eval_file", True),
    "use_cpu": _none("the device comes from accelerate (CPU when no accelerator is present)", True),
    "torch_compile": _alias("compile", True),
    "ddp_find_unused_parameters": _none("accelerate's DDP defaults are used", False),
    "model_name_or_path": _alias("model", "path/to/model"),  # trl's ModelConfig (scripts)
    "use_peft": _alias("lora", True), "lora_r": _same(16), "lora_alpha": _same(32),
    "lora_dropout": _same(0.05),
    "lora_target_modules": _same(["q_proj", "v_proj"]),
    "dataset_name": _alias("train_file", "trl-lib/ultrafeedback_binarized"),  # trl's ScriptArguments
    "dataset_config": _same("default"), "dataset_train_split": _alias("train_split", "train"),
    "dataset_test_split": _alias("eval_split", "test"),
}
_LEGACY = {  # names of TRL 0.x configs
    "max_prompt_length": _same(256), "max_completion_length": _same(256),
    "rpo_alpha": _t("loss", _rpo, 1.0),
    "reference_free": _none("choose a reference-free loss instead: loss: simpo or orpo", True),
    "generate_during_eval": _none("run `preftune eval` on the saved model for samples and win rates", True),
    "model_adapter_name": _none("LoRA adapters are created by preftune (lora: true)", "train"),
    "ref_adapter_name": _none("reference: adapter scores the base model with the adapters off", "ref"),
    "force_use_ref_model": _none("set reference: model to score a frozen copy", True),
    "ref_model_init_kwargs": _none("use reference_model for other reference weights", {"dtype": "bfloat16"}),
    "is_encoder_decoder": _none("causal language models only", True),
    "use_logits_to_keep": _none("logits are only computed at completion tokens, always", True),
    "padding_value": _none("padding comes from the tokenizer", 0),
    "label_pad_token_id": _none("no label padding is used", -100),
    "tools": _none("tool definitions are not rendered into prompts", []),
}
TRL_CONFIGS: dict[str, tuple[str, ...]] = {
    "DPOConfig": tuple(_DPO), "RewardConfig": tuple(n for n in _REWARD) + ("learning_rate", "max_length"),
    "KTOConfig": tuple(_KTO) + ("beta", "loss_type", "precompute_ref_log_probs", "max_length"),
    "TrainingArguments and ModelConfig": tuple(_BASE), "earlier TRL (0.x)": tuple(_LEGACY),
}
TRL_NAMES: dict[str, TrlName] = {**_DPO, **_REWARD, **_KTO, **_BASE, **_LEGACY}


def _one_of(*accepted: Any) -> Callable[[Any, dict[str, Any]], bool]:
    return lambda value, values: value in accepted


def _anything(value: Any, values: dict[str, Any]) -> bool:
    return True


def _has_eval(value: Any, values: dict[str, Any]) -> bool:
    return not value or any(values.get(k) for k in ("eval_file", "eval_split", "dataset_test_split"))


# values of TRL names without an equivalent that ask for what preftune does anyway (TRL's defaults, mostly,
# as a dumped TrainingArguments holds them): accepted with a notice, so a TRL file runs unchanged
INERT: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
    "model_init_kwargs": _one_of(None, {}), "dataset_num_proc": _anything,
    "truncation_mode": _one_of("keep_end"), "pad_to_multiple_of": _one_of(None),
    "precompute_ref_batch_size": _one_of(None), "ld_alpha": _one_of(None),
    "f_divergence_type": _one_of("reverse_kl"),
    "f_alpha_divergence_coef": lambda v, values: values.get("f_divergence_type") in (None, "reverse_kl"),
    "use_weighting": _one_of(False), "activation_offloading": _one_of(False),
    "sync_ref_model": _one_of(False),
    "ref_model_mixup_alpha": lambda v, values: not values.get("sync_ref_model"),
    "ref_model_sync_steps": lambda v, values: not values.get("sync_ref_model"),
    "pad_token": _one_of(None), "eos_token": _one_of(None), "center_rewards_coefficient": _one_of(None),
    "router_aux_loss_coef": _anything,  # read only by mixture-of-experts models' own loss (not used)
    "fp16": _one_of(False), "lr_scheduler_kwargs": _one_of(None, {}), "use_liger_kernel": _one_of(False),
    "torch_empty_cache_steps": _one_of(None), "adam_epsilon": _one_of(1e-8), "data_seed": _one_of(None),
    "save_strategy": lambda v, values: v == "steps" or (v == "no" and not values.get("save_steps")),
    "save_only_model": _one_of(False), "logging_strategy": _one_of("steps"),
    "logging_first_step": _one_of(False), "push_to_hub": _one_of(False),
    "hub_model_id": lambda v, values: not values.get("push_to_hub"), "dataloader_num_workers": _anything,
    "remove_unused_columns": _anything, "do_train": _one_of(True, False), "do_eval": _has_eval,
    "use_cpu": _one_of(False), "ddp_find_unused_parameters": _one_of(None, False),
    "reference_free": _one_of(False), "generate_during_eval": _one_of(False),
    "force_use_ref_model": _one_of(False), "model_adapter_name": _one_of(None),
    "ref_adapter_name": _one_of(None), "ref_model_init_kwargs": _one_of(None),
    "is_encoder_decoder": _one_of(None, False), "use_logits_to_keep": _anything,
    "padding_value": _one_of(None), "label_pad_token_id": _anything, "tools": _one_of(None, []),
    "train_sampling_strategy": _one_of("random"),
}


def translate(values: dict[str, Any], fields: set[str], *, cls_name: str, source: str) -> dict[str, Any]:
    """Replace TRL names that are not preftune keys of ``fields`` with their preftune settings,
    one notice each; a TRL name with no equivalent is a ValueError naming ``source``."""
    out = {k: v for k, v in values.items() if k not in TRL_NAMES or k in fields}
    for key in sorted((k for k in values if k not in out), key=lambda k: k == "loss_weights"):
        entry, value = TRL_NAMES[key], values[key]
        if entry.kind == "none" and key in INERT and INERT[key](value, values):
            logger.info("config: %s: %s is TRL's; it changes nothing in preftune (%s)", key, _show(value),
                        entry.note)
            continue
        if entry.kind == "none" or (entry.kind == "same" and key not in fields):
            why = entry.note or f"{cls_name} has no such setting"
            raise ValueError(f"{source}: {key!r} is a TRL name with no preftune equivalent: {why}")
        try:
            updates = entry.transform(value, values) if entry.transform else _nested(entry.target, value)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        head = next(iter(updates), entry.target).split(".")[0]
        if updates and head not in fields:
            raise ValueError(f"{source}: TRL's {key!r} is preftune's {entry.target!r}, which {cls_name} "
                             "does not have")
        for k, v in updates.items():
            merge = isinstance(v, dict) and isinstance(out.get(k), dict) and k != "loss"
            out[k] = {**out[k], **v} if merge else v
        shown = ", ".join(f"{k}: {_show(v)}" for k, v in _flat(updates).items()) or "nothing to set"
        logger.warning("config: %s is TRL's name; using %s (%s)", key, shown, source)
    return out


def _nested(target: str, value: Any) -> dict[str, Any]:
    head, _, rest = target.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "loss_params":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def markdown_table() -> str:
    """The mapping as Markdown (the body of docs/trl.md)."""
    lines = [f"# TRL names in preftune\n\nGenerated from `preftune.engine.trl_names` (TRL {TRL_VERSION} plus "
             "earlier 0.x names). A TRL name in a YAML file or on the command line is accepted with a "
             "one-line notice when it has an equivalent, or when its value asks for what preftune does "
             "anyway (TRL's default, mostly), and is an error saying why otherwise.\n"]
    for group, names in TRL_CONFIGS.items():
        lines += [f"## {group}\n", "| TRL name | preftune |", "|---|---|"]
        for name in dict.fromkeys(names):
            e = TRL_NAMES[name]
            what = {"same": "same name", "alias": f"`{e.target}`",
                    "transform": f"`{e.target}` (value translated)",
                    "none": f"no equivalent: {e.note}"}[e.kind]
            if name in INERT:
                what += " (values that ask for what preftune does are accepted)"
            lines.append(f"| `{name}` | {what} |")
        lines.append("")
    return "\n".join(lines)
