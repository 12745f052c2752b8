"""One module per training method, each a config, an objective and a step source handed to the
engine: ``dpo.py`` (DPO and every registered preference loss, KTO included), ``sft.py``,
``reward.py`` (Bradley-Terry reward models), ``ppo.py`` with its settings and rollouts beside it
(``ppo_config.py``, ``ppo_rollout.py``), ``iterate.py`` (iterative DPO: sample, judge, retrain) with
its pairs beside it (``iterate_pairs.py``).

Layer rule: imports ``engine``, ``rewards``, ``model``, ``losses``, ``data`` and the leaves. A new
method is a new module here (and its line in :data:`CONFIG_CLASSES` for ``--help``).
"""

from __future__ import annotations

#: command -> (module, config class): what ``preftune COMMAND --help`` lists (read from the source)
CONFIG_CLASSES = {
    "dpo": ("preftune.methods.dpo", "DPOConfig"),
    "sft": ("preftune.methods.sft", "SFTConfig"),
    "ppo": ("preftune.methods.ppo_config", "PPOConfig"),
    "reward": ("preftune.methods.reward", "RewardConfig"),
    "iterate": ("preftune.methods.iterate", "IterateConfig"),
}
#: command -> {key: command}: keys that hold another command's config (listed as ``--dpo.KEY``)
NESTED_CONFIGS = {"iterate": {"dpo": "dpo"}}
