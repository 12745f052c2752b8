"""``preftune lab EXPERIMENT``: the experiments on the embedded model."""

from __future__ import annotations

import sys

EXPERIMENTS = {
    "frontier": ("reward vs KL of DPO, IPO, PPO, preferred-FT and best-of-N (the DPO paper's Figure 2)",
                 "preftune.lab.frontier"),
    "iterate": ("iterative (online) DPO vs offline DPO on the same number of judged pairs",
                "preftune.lab.iterative"),
    "vision": ("SFT then DPO of a tiny image-text model on synthetic images: accuracy, win rate, KL",
               "preftune.lab.vision_seeds"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: preftune lab EXPERIMENT [options]\n\nexperiments:")
        for name, (text, _) in EXPERIMENTS.items():
            print(f"  {name:<12} {text}")
        print("\n`preftune lab EXPERIMENT --help` lists an experiment's options with their defaults.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        print(f"preftune lab: unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(EXPERIMENTS[name][1]).main(rest)
