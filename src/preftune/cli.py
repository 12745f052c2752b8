"""``preftune`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {}


def command(name: str, help_text: str):
    def register(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        COMMANDS[name] = (help_text, fn)
        return fn

    return register


def _config_args(prog: str, description: str, argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Any config key can be given as --key value (e.g. --loss_params.beta 0.2).")
    parser.add_argument("--config", help="YAML file (read with yaml.safe_load)")
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


@command("dpo", "train a policy with DPO or any registered preference loss")
def _dpo(argv: list[str]) -> int:
    from preftune.train.dpo import load_dpo_config, train_dpo

    path, overrides = _config_args("preftune dpo", "Train with DPO (and its variants).", argv)
    run = train_dpo(load_dpo_config(path, overrides))
    last = run.train.history[-1] if run.train.history else {}
    print(f"done: {run.train.steps} steps, final loss {last.get('loss', float('nan')):.4f}, "
          f"model in {run.train.final_dir}")
    return 0


@command("sft", "supervised fine-tuning on demonstrations (the model DPO and PPO start from)")
def _sft(argv: list[str]) -> int:
    from preftune.train.sft import load_sft_config, train_sft

    path, overrides = _config_args("preftune sft", "Supervised fine-tuning: {prompt, completion}, {messages} "
                                   "(assistant turns trained) or the chosen side of preference rows.", argv)
    run = train_sft(load_sft_config(path, overrides))
    last = run.train.history[-1] if run.train.history else {}
    print(f"done: {run.train.steps} steps, final loss {last.get('loss', float('nan')):.4f} "
          f"(perplexity {last.get('perplexity', float('nan')):.2f}), model in {run.train.final_dir}")
    return 0


@command("ppo", "RLHF with PPO and a KL penalty against a reward model or function")
def _ppo(argv: list[str]) -> int:
    from preftune.train.ppo import load_ppo_config, train_ppo

    path, overrides = _config_args("preftune ppo", "PPO with a KL penalty: rollouts from the policy, a reward "
                                   "(reward_model or reward_fn), GAE, clipped policy and value losses.", argv)
    run = train_ppo(load_ppo_config(path, overrides))
    last = run.train.history[-1] if run.train.history else {}
    print(f"done: {run.train.steps} steps, reward {last.get('env/reward', float('nan')):.4f}, "
          f"KL {last.get('objective/kl', float('nan')):.3f}, model in {run.train.final_dir}")
    return 0


@command("reward", "train a Bradley-Terry reward model on preference pairs")
def _reward(argv: list[str]) -> int:
    from preftune.train.reward import load_reward_config, train_reward

    path, overrides = _config_args("preftune reward", "Train a scalar reward model.", argv)
    run = train_reward(load_reward_config(path, overrides))
    print(f"done: {run.steps} steps, model in {run.final_dir}")
    return 0


@command("convert-llama2c", "convert a llama2.c model + tokenizer to a Hugging Face directory")
def _convert(argv: list[str]) -> int:
    from preftune.model.convert_llama2c import convert_llama2c

    parser = argparse.ArgumentParser(prog="preftune convert-llama2c")
    parser.add_argument("model_bin")
    parser.add_argument("tokenizer_bin")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(convert_llama2c(args.model_bin, args.tokenizer_bin, args.out_dir))
    return 0


@command("bt", "fit Bradley-Terry strengths from a CSV of pairwise wins")
def _bt(argv: list[str]) -> int:
    from preftune.eval.bradley_terry import main as bt_main

    return bt_main(argv)


@command("demo", "the whole DPO pipeline on the embedded model: sample, judge, train, evaluate")
def _demo(argv: list[str]) -> int:
    from preftune.lab.demo import main as demo_main

    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: preftune COMMAND [options]\n\ncommands:")
        for name, (help_text, _) in COMMANDS.items():
            print(f"  {name:<16} {help_text}")
        print("\n`preftune COMMAND --help` shows a command's options.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"preftune: unknown command {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; our own progress bar stays
    try:
        return COMMANDS[name][1](rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"preftune {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
