"""``bench_dpo.py worker``: one trainer, one configuration, one process (peak RSS is per process). Reads the
spec ``dpo_runs.launch`` wrote and writes the result file it names: per-step wall and CPU times and
metrics, peak RSS, the memory after imports, and for TRL the check that it trained on preftune's ids."""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dpo_setup import now, preftune_config

Steps = list[tuple[float, float, dict]]  # (wall clock, CPU time, logged metrics) at the end of each step
_METRICS = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm", "logps/chosen",
            "logps/rejected")


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    trainer, mode = spec["run"].split(":")
    import torch

    if trainer == "preftune":
        import preftune.methods.dpo  # noqa: F401
    else:
        import trl  # noqa: F401
    import psutil

    torch.set_num_threads(spec["threads"])
    result: dict[str, Any] = {"run": spec["run"], "import_rss": psutil.Process().memory_info().rss}
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    try:
        result["loadavg_start"] = os.getloadavg()[0]
        cpu0, t0 = os.times(), time.perf_counter()
        run = _run_preftune if trainer == "preftune" else _run_trl
        steps = run(spec, mode, tmp, result)
        result["e2e_s"] = time.perf_counter() - t0
        cpu1 = os.times()
        result["user_s"], result["sys_s"] = cpu1.user - cpu0.user, cpu1.system - cpu0.system
        result["loadavg_end"] = os.getloadavg()[0]
        if torch.cuda.is_available():
            result["gpu_peak"] = torch.cuda.max_memory_allocated()
        result["step_end_s"] = [t - t0 for t, _, _ in steps]
        result["step_end_cpu_s"] = [c - (cpu0.user + cpu0.system) for _, c, _ in steps]
        result["metrics"] = [row for _, _, row in steps]
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["threads"] = torch.get_num_threads()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(spec["out"]).write_text(json.dumps(result))


def _pick(row: dict) -> dict:
    return {k: float(row[k]) for k in _METRICS if k in row}


def _run_preftune(spec: dict, mode: str, tmp: Path, result: dict) -> Steps:
    from preftune.methods.dpo import train_dpo

    steps: Steps = []
    config = preftune_config(model_dir=spec["model_dir"], train_file=spec["train_file"],
                             batch_size=spec["batch_size"], total_steps=spec["total_steps"],
                             max_length=spec["max_length"], seed=spec["seed"], reference=mode, tmp=tmp,
                             options=spec["preftune_options"])
    run = train_dpo(config, callbacks=[lambda step, row: steps.append((*now(), _pick(row)))])
    result["reference_mode"] = run.reference_mode
    assert len(run.data.train.pairs) == spec["n_pairs"], "preftune dropped or added pairs"
    return steps


def _trl_config(spec: dict, mode: str, tmp: Path) -> Any:
    """TRL's DPOConfig of a run: its defaults but for what preftune's run fixes (fp32, lr, beta, clip, ...);
    ``model`` / ``precomputed`` turn gradient checkpointing off (like for like with preftune)."""
    from trl import DPOConfig

    options: dict[str, Any] = {}
    if mode != "default":
        options["gradient_checkpointing"] = False
    if mode == "precomputed":
        options["precompute_ref_log_probs"] = True
    return DPOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["total_steps"], learning_rate=1e-6, beta=0.1, max_length=spec["max_length"],
        bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=spec["seed"], use_cpu=not spec["cuda"], dataloader_num_workers=0, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, **options,
    )


def _run_trl(spec: dict, mode: str, tmp: Path, result: dict) -> Steps:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    class SequentialDPOTrainer(DPOTrainer):
        """DPOTrainer reading the rows in the given order (preftune's permutation), for any transformers."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with open(spec["train_file"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list([rows[i] for i in spec["order"]])
    steps: Steps = []
    logged: dict[int, dict] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append((*now(), {}))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged[state.global_step] = _pick(logs)

    args = _trl_config(spec, mode, tmp)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = SequentialDPOTrainer(model=spec["model_dir"], args=args, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    steps = [(t, c, logged.get(i + 1, {})) for i, (t, c, _) in enumerate(steps)]
    result["token_mismatches"] = _token_mismatches(spec, trainer.train_dataset)  # not timed
    result["trl_rows"] = len(trainer.train_dataset)
    optimizer = trainer.optimizer
    result["optimizer"] = type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__
    result["trl_gradient_checkpointing"] = args.gradient_checkpointing
    return steps


def _token_mismatches(spec: dict, got: Any) -> int:
    """Sequences whose ids TRL trained on differ from preftune's (prompt + completion, first max_length)."""
    expected = json.loads(Path(spec["ids_file"]).read_text())
    mismatches = 0
    m = spec["max_length"]
    for k, i in enumerate(spec["order"]):
        p, c, r = expected[i]
        row = got[k]
        mismatches += (row["prompt_ids"] + row["chosen_ids"])[:m] != p + c
        mismatches += (row["prompt_ids"] + row["rejected_ids"])[:m] != p + r
    return mismatches
