"""``preftune`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import yaml

from preftune.cli_args import OneLineParser

COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {}


def command(name: str, help_text: str):
    def register(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        COMMANDS[name] = (help_text, fn)
        return fn

    return register


def _config_args(prog: str, description: str, argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config`` and the ``--key value`` overrides; ``--help`` lists every key of the command's
    config class (read from its source: no torch import)."""
    from preftune.engine.keys_help import format_keys
    from preftune.methods import CONFIG_CLASSES, NESTED_CONFIGS

    command = prog.split()[-1]
    nested = {key: CONFIG_CLASSES[other] for key, other in NESTED_CONFIGS.get(command, {}).items()}
    parser = OneLineParser(prog=prog, description=description,
                           epilog=format_keys(CONFIG_CLASSES[command], nested),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (read with yaml.safe_load)")
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def _main_process() -> bool:
    """False on the other processes of a ``torchrun`` / ``accelerate launch`` job (``RANK`` > 0)."""
    return os.environ.get("RANK", "0") == "0"


def _say(text: str) -> None:
    """A result line, printed once per job (by its main process)."""
    if _main_process():
        print(text)


@command("dpo", "train a policy with DPO or any registered preference loss")
def _dpo(argv: list[str]) -> int:
    path, overrides = _config_args("preftune dpo", "Train with DPO (and its variants).", argv)
    from preftune.methods.dpo import load_dpo_config, train_dpo

    run = train_dpo(load_dpo_config(path, overrides))
    last = run.train.history[-1] if run.train.history else {}
    _say(f"done: {run.train.steps} steps, final loss {last.get('loss', float('nan')):.4f}, "
          f"model in {run.train.final_dir}")
    return 0


@command("sft", "supervised fine-tuning on demonstrations (the model DPO and PPO start from)")
def _sft(argv: list[str]) -> int:
    path, overrides = _config_args("preftune sft", "Supervised fine-tuning: {prompt, completion}, {messages} "
                                   "(assistant turns trained) or the chosen side of preference rows.", argv)
    from preftune.methods.sft import load_sft_config, train_sft

    run = train_sft(load_sft_config(path, overrides))
    last = run.train.history[-1] if run.train.history else {}
    _say(f"done: {run.train.steps} steps, final loss {last.get('loss', float('nan')):.4f} "
          f"(perplexity {last.get('perplexity', float('nan')):.2f}), model in {run.train.final_dir}")
    return 0


@command("ppo", "RLHF with PPO and a KL penalty against a reward model or function")
def _ppo(argv: list[str]) -> int:
    path, overrides = _config_args("preftune ppo", "PPO with a KL penalty: rollouts from the policy, a "
                                   "reward (reward_model or reward_fn), GAE, clipped policy and value "
                                   "losses.", argv)
    from preftune.methods.ppo import load_ppo_config, train_ppo

    run = train_ppo(load_ppo_config(path, overrides))
    last = run.train.history[-1] if run.train.history else {}
    _say(f"done: {run.train.steps} steps, reward {last.get('env/reward', float('nan')):.4f}, "
          f"KL {last.get('objective/kl', float('nan')):.3f}, model in {run.train.final_dir}")
    return 0


@command("reward", "train a Bradley-Terry reward model on preference pairs")
def _reward(argv: list[str]) -> int:
    path, overrides = _config_args("preftune reward", "Train a scalar reward model.", argv)
    from preftune.methods.reward import load_reward_config, train_reward

    run = train_reward(load_reward_config(path, overrides))
    _say(f"done: {run.steps} steps, model in {run.final_dir}")
    return 0


@command("convert-llama2c", "convert a llama2.c model + tokenizer to a Hugging Face directory")
def _convert(argv: list[str]) -> int:
    from preftune.model.convert_llama2c import convert_llama2c

    parser = OneLineParser(prog="preftune convert-llama2c")
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


@command("iterate", "iterative (online) DPO: sample from the policy, judge, build pairs, train, repeat")
def _iterate(argv: list[str]) -> int:
    path, overrides = _config_args("preftune iterate", "Iterative (online) DPO: rounds of sample -> judge "
                                   "-> build pairs -> DPO -> evaluate.", argv)
    from preftune.engine.config import load_config
    from preftune.methods.iterate import IterateConfig, train_iterative

    result = train_iterative(load_config(IterateConfig, path, overrides))
    last = result.rounds[-1]
    first = result.rounds[0]  # round 0 (the starting model) when there is a held-out evaluation
    extra = (f", held-out reward {first['eval/reward']:.4f} -> {last['eval/reward']:.4f}, KL "
             f"{last['eval/kl']:.3f}" if "eval/reward" in last else "")
    trained = sum(1 for r in result.rounds if r["round"] > 0)
    _say(f"done: {trained} round{'s' if trained != 1 else ''}{extra}; final model in {result.final_dir}")
    return 0


@command("eval", "evaluate models against a baseline: accuracy, win rate, KL, length, leaderboard")
def _eval(argv: list[str]) -> int:
    from preftune.eval.evaluate import main as eval_main

    return eval_main(argv)


@command("inspect", "report what preference data will teach before training on it (no model needed)")
def _inspect(argv: list[str]) -> int:
    from preftune.doctor.cli import inspect_main

    return inspect_main(argv)


@command("aggregate", "turn several annotators' judgments into soft preference labels")
def _aggregate(argv: list[str]) -> int:
    from preftune.doctor.cli import aggregate_main

    return aggregate_main(argv)


@command("select", "pick the unlabelled pairs whose labels would inform the model most")
def _select(argv: list[str]) -> int:
    from preftune.doctor.cli import select_main

    return select_main(argv)


@command("lab", "experiments on the embedded model: `preftune lab frontier` (reward vs KL of DPO, PPO, ...)")
def _lab(argv: list[str]) -> int:
    from preftune.lab.cli import main as lab_main

    return lab_main(argv)


@command("demo", "the whole DPO pipeline on the embedded model: sample, judge, train, evaluate")
def _demo(argv: list[str]) -> int:
    from preftune.lab.demo import main as demo_main

    return demo_main(argv)


def user_message(error: Exception) -> str:
    """The line a user error prints: an OS error as 'what: path', a YAML error with its place."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror.lower()}: {error.filename}"
    if isinstance(error, yaml.YAMLError):
        from preftune.engine.config import yaml_problem

        return f"not valid YAML: {yaml_problem(error)}"
    return str(error)


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
    # the other processes of a multi-process job log warnings and errors only
    logging.basicConfig(level=logging.INFO if _main_process() else logging.WARNING, format="%(message)s")
    from preftune.hardware import process_owned

    try:  # transformers' bars and expected warnings are quieted where models load (preftune.quiet)
        with process_owned():  # the command owns the process: `auto` hardware settings may apply
            return COMMANDS[name][1](rest)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, yaml.YAMLError) as e:
        # the user's error: one line, exit 2
        print(f"preftune {name}: error: {user_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        # e.g. a checkpoint that could not be written (disk full): the message says what is safe
        from preftune.engine.checkpoint import CheckpointWriteError

        if not isinstance(e, CheckpointWriteError):
            raise
        print(f"preftune {name}: error: {e}", file=sys.stderr)
        return 1
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    """Under torchrun / accelerate launch: stop the process group before the interpreter exits
    (gloo's threads otherwise may abort the process at exit)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
