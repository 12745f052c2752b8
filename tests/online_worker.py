"""Run by tests/test_online_processes.py under torchrun (or alone): one online run, PPO or iterative
DPO, on the toy prompts of test_ppo. Prints ``JUDGED <rank> <n>`` (completions this process judged);
the main process writes its result to ``<tmp_dir>/<output_name>.result.json``.

argv: tmp_dir output_name method per_process_batch"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import apply_test_cpu_linear  # noqa: E402
from test_ppo import PROMPTS, low_words, tiny_config  # noqa: E402

apply_test_cpu_linear()
tmp, out, method, batch_size = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rank = int(os.environ.get("RANK", "0"))
judged = []


def reward(prompts, completions):
    judged.append(len(completions))
    if method == "ppo-fail" and rank == 1:  # a judge that fails on one process only
        raise RuntimeError("the judge of process 1 broke")
    return low_words(prompts, completions)


if method in ("ppo", "ppo-fail"):
    from preftune.methods.ppo import train_ppo

    run = train_ppo(tiny_config(tmp, output_dir=str(tmp / out), rollout_batch_size=24, num_rollouts=1,
                                batch_size=batch_size), prompts=PROMPTS, reward_fn=reward)
    result = {"history": run.train.history, "final": str(run.train.final_dir)}
if method == "iterate":
    from preftune.methods.iterate import train_iterative

    tiny_config(tmp)  # writes the tiny model once
    dpo = {"batch_size": batch_size, "learning_rate": 3e-3, "progress_bar": False, "max_steps": 2,
           "gradient_checkpointing": False, "reference_cache_dir": str(tmp / f"cache-{out}")}
    config = {"model": str(tmp / "model"), "output_dir": str(tmp / out), "rounds": 1, "samples_per_prompt": 4,
              "max_new_tokens": 6, "dpo": dpo}
    run = train_iterative(config, prompts=PROMPTS, reward_fn=reward)
    result = {"rounds": run.rounds, "final": str(run.final_dir)}
if method == "iterate-images":  # the test wrote the tiny image-text model and the lab's prompt file
    from preftune.methods.iterate import train_iterative

    def looks(prompts, completions, images):
        judged.append(len(completions))
        return [len(c) + len(i[0]) % 3 for c, i in zip(completions, images)]

    dpo = {"batch_size": batch_size, "learning_rate": 1e-3, "progress_bar": False, "max_steps": 2,
           "gradient_checkpointing": False, "save_steps": 0, "reference_cache_dir": str(tmp / f"cache-{out}")}
    config = {"model": str(tmp / "vlm"), "train_file": str(tmp / "data" / "prompts.jsonl"),
              "output_dir": str(tmp / out), "rounds": 1, "samples_per_prompt": 4, "max_new_tokens": 4,
              "dpo": dpo}
    run = train_iterative(config, reward_fn=looks)
    result = {"rounds": run.rounds, "final": str(run.final_dir)}
print(f"JUDGED {rank} {sum(judged)}", flush=True)
if rank == 0:
    (tmp / f"{out}.result.json").write_text(json.dumps(result))

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.destroy_process_group()
