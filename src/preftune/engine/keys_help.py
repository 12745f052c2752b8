"""``preftune COMMAND --help``: every config key with its type, default and meaning, generated from
the config dataclasses' source (read with :mod:`ast`, so ``--help`` imports neither torch nor
transformers). A key's meaning is the field's trailing comment, else its line in :data:`MEANINGS`.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

MEANINGS = {
    "train_file": "training data file(s): .jsonl .json .csv .parquet (optionally .gz) or a datasets "
                  "directory",
    "eval_file": "held-out data file(s), evaluated every eval_steps and at the end",
    "skip_bad_rows": "count and skip malformed rows instead of stopping at the first",
    "data_cache_dir": "where tokenized data is cached, keyed by the files, tokenizer and budgets "
                      "(default ~/.cache/preftune/tokenized)",
    "max_length": "token budget of prompt + completion (null: unlimited)",
    "max_prompt_length": "token budget of the prompt; it loses its start, BOS kept (null: unlimited)",
    "max_completion_length": "token budget of each completion; it loses its end (null: only max_length)",
    "model": "the policy to start from: a local Hugging Face causal LM directory, or 'embedded'",
    "tokenizer": "tokenizer directory (default: the model's)",
    "chat_template": "a Jinja chat template (file or text) for conversational rows (default: the "
                     "tokenizer's)",
    "trust_remote_code": "allow custom model code from the model directory",
    "disable_dropout": "turn dropout off in the policy (and reference)",
    "gradient_checkpointing": "'auto': the fastest of off, selective, full that fits memory_budget_gib; "
                              "true/'full': recompute each layer in backward (least memory); 'selective': "
                              "keep matmul outputs, recompute elementwise ops; false/'off': keep everything "
                              "(the output layer's [tokens, vocab] probabilities too, where they fit the "
                              "memory budget)",
    "compile": "torch.compile each decoder layer's norms and dense MLP (fused elementwise work; compiles on "
               "the first steps; CPU needs a C++ compiler)",
    "memory_budget_gib": "activation memory for gradient_checkpointing: auto, and for off's output-layer "
                         "probabilities (default: 0.8 x (free memory - gradients - optimizer state)); only "
                         "with auto or off",
    "cpu_allocator": "glibc malloc when training on the CPU: 'fast' keeps freed memory for reuse (no page "
                     "faults), 'lean' returns blocks over 1 MiB at once (lowest peak), 'system' leaves "
                     "glibc's settings; 'auto': fast on the CPU with glibc, else system",
    "cpu_linear": "which library runs fp32 linear layers on the CPU: 'onednn' (oneDNN for the forward and "
                  "input gradient, BLAS for the weight gradient: forward + backward 1.12-1.24x faster on the "
                  "benchmark CPU), 'torch' (PyTorch's BLAS path); 'auto': onednn on an x86 CPU whose PyTorch "
                  "has oneDNN, else torch",
    "optimizer_in_backward": "apply each tensor's optimizer update in backward and free its gradient (no "
                             "full set of gradients in memory: the floor is weights + optimizer state); "
                             "needs max_grad_norm: null, gradient_accumulation_steps: 1, one process",
    "lora": "train LoRA adapters (peft) instead of all weights",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling alpha",
    "lora_dropout": "dropout on the LoRA path",
    "lora_target_modules": "modules that get adapters ('all-linear' or a list of names)",
    "lora_projector": "image-text models: adapters on the image projector too (default: language model only)",
    "layout": "forward-pass layout: prefix_shared, packed or padded (all exact; the first two run unpadded "
              "on supported models)",
    "pack_length": "row width when short pairs share a row (default: the longest pair); only the dense-mask "
                   "forward of models without unpadded support has rows",
    "batch_size": "pairs (examples) per micro-batch on each process",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "epochs": "passes over the training data (when max_steps is not set)",
    "max_steps": "optimizer steps of the run (overrides epochs)",
    "learning_rate": "peak learning rate",
    "optimizer": "'adamw' (fused) or 'rmsprop'",
    "weight_decay": "decoupled weight decay",
    "adam_betas": "AdamW's (beta1, beta2)",
    "lr_scheduler": "decay after warmup: linear, cosine or constant",
    "warmup_ratio": "warmup as a fraction of the steps",
    "warmup_steps": "warmup steps (overrides warmup_ratio)",
    "max_grad_norm": "gradient clipping norm (null: no clipping)",
    "precision": "'fp32' or 'bf16' (autocast; weights and optimizer state stay fp32)",
    "seed": "seeds data order, initialisation and sampling",
    "output_dir": "where metrics.jsonl, checkpoints and final/ go",
    "logging_steps": "log a metrics row every N steps",
    "eval_steps": "evaluate every N steps (null: only at the end)",
    "save_steps": "write a checkpoint every N steps (null: none)",
    "save_final": "save the final model to output_dir/final",
    "report_to": "trackers (a name or a list): tensorboard, wandb, mlflow, trackio, aim, comet_ml, clearml, "
                 "swanlab, dvclive; all (installed) or none. metrics.jsonl is always written",
    "progress_bar": "a progress bar on a terminal, a log line every logging_steps otherwise",
    "loss": "a registered loss name, or {name: weight} (e.g. {sigmoid: 1.0, sft: 0.2})",
    "loss_params": "loss hyperparameters by name: {beta: 0.1, label_smoothing: 0.0, ...}",
    "reference": "auto | model (frozen copy) | adapter (LoRA off) | precomputed",
    "reference_model": "the reference's weights (default: model)",
    "reference_cache_dir": "where precomputed reference log-probs are cached (default ~/.cache/preftune)",
    "reward_model": "a `preftune reward` model directory scoring the rollouts",
    "reward_fn": "'sentiment' or package.module:function(prompts, completions) -> rewards",
    "rollout_batch_size": "prompts per rollout",
    "num_rollouts": "rollout rounds (default: epochs passes over the prompts)",
    "max_new_tokens": "length limit of each sampled completion",
    "temperature": "sampling temperature of the rollouts",
    "ppo_epochs": "passes over each rollout",
    "gamma": "GAE discount",
    "lam": "GAE lambda",
    "clip_range": "PPO policy clip range",
    "clip_range_value": "value-function clip range (null: unclipped)",
    "vf_coef": "weight of the value loss",
    "kl_coef": "KL penalty coefficient (initial value with kl_target)",
    "kl_horizon": "horizon of the adaptive KL controller",
    "kl_estimator": "per-token KL estimator: k1 or k3",
    "whiten_rewards": "whiten rewards per rollout",
    "missing_eos_penalty": "reward subtracted from completions without EOS",
    "length_penalty": "reward subtracted per generated token",
}


@dataclass(frozen=True)
class Key:
    name: str
    type: str
    default: str
    meaning: str


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(module)
    return Path(spec.origin)


def _classes(path: Path) -> dict[str, tuple[ast.ClassDef, list[str]]]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = (node, lines)
    return out


def _default(value: ast.expr | None) -> str:
    if value is None:
        return "required"
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory":
                body = kw.value.body if isinstance(kw.value, ast.Lambda) else kw.value
                return ast.unparse(body).replace("dict()", "{}").replace("list()", "[]") if not (
                    isinstance(body, ast.Name)) else {"dict": "{}", "list": "[]"}.get(body.id, body.id)
            if kw.arg == "default":
                return ast.unparse(kw.value)
    return ast.unparse(value)


def config_keys(config_class: tuple[str, str]) -> list[Key]:
    """The keys of a config class given as (module, class name), e.g. ``("preftune.methods.dpo",
    "DPOConfig")`` (:data:`preftune.methods.CONFIG_CLASSES`), base class first, overrides in place."""
    module, name = config_class
    keys: dict[str, Key] = {}
    _collect(module, name, keys)
    return list(keys.values())


def _collect(module: str, name: str, keys: dict[str, Key]) -> None:
    classes = _classes(_source(module))
    node, lines = classes[name]
    for base in node.bases:
        base_name = ast.unparse(base)
        if base_name in classes:
            _collect(module, base_name, keys)
        elif base_name == "TrainConfig":
            _collect("preftune.engine.config", "TrainConfig", keys)
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        key = stmt.target.id
        comment = lines[stmt.end_lineno - 1].partition("  # ")[2].strip()
        meaning = comment or MEANINGS.get(key) or (keys[key].meaning if key in keys else "")
        keys[key] = Key(key, ast.unparse(stmt.annotation), _default(stmt.value), meaning)


def format_keys(config_class: tuple[str, str], nested: dict[str, tuple[str, str]] | None = None) -> str:
    """The help block of a config class (see :func:`config_keys`): ``--key TYPE (default D)  meaning``
    per key; ``nested``: keys that hold another config (iterate's ``dpo``), whose keys are listed as
    ``--dpo.KEY``."""
    keys = config_keys(config_class)
    inner = {prefix: config_keys(cls) for prefix, cls in (nested or {}).items()}
    names = [k.name for k in keys] + [f"{p}.{k.name}" for p, ks in inner.items() for k in ks]
    width = max(len(n) for n in names) + 2
    rows = ["config keys (in the YAML file, or as --key value; nested: --loss_params.beta 0.2):"]
    for prefix, group in [("", keys), *((f"{p}.", ks) for p, ks in inner.items())]:
        if prefix:
            name = prefix[:-1]
            rows.append(f"keys of {name} (as --{prefix}KEY value, or under {name}: in the YAML file):")
        for k in group:
            rows.append(f"  --{prefix + k.name:<{width}} {k.type} = {k.default}")
            if k.meaning:
                rows.append(f"  {'':<{width + 2}} {k.meaning}")
    rows.append("TRL names (beta, per_device_train_batch_size, bf16, ...) are accepted; see docs/trl.md.")
    return "\n".join(rows)
