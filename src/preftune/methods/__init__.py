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

#: BibTeX of each method, for its models' cards (engine/model_card.py)
CITATIONS = {
    "dpo": """@inproceedings{rafailov2023direct,
  title = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Stefano Ermon and Christopher D. Manning
            and Chelsea Finn},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2023}
}""",
    "reward": """@inproceedings{ouyang2022training,
  title = {Training language models to follow instructions with human feedback},
  author = {Long Ouyang and others},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2022}
}""",
    "ppo": """@article{schulman2017proximal,
  title = {Proximal Policy Optimization Algorithms},
  author = {John Schulman and Filip Wolski and Prafulla Dhariwal and Alec Radford and Oleg Klimov},
  journal = {arXiv preprint arXiv:1707.06347},
  year = {2017}
}
@article{ziegler2019fine,
  title = {Fine-Tuning Language Models from Human Preferences},
  author = {Daniel M. Ziegler and others},
  journal = {arXiv preprint arXiv:1909.08593},
  year = {2019}
}""",
}
