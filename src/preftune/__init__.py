"""preftune: preference tuning of language models (DPO and its family)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["DPOConfig", "train_dpo", "__version__"]


def __getattr__(name: str):
    # lazy: `import preftune` stays cheap; torch/transformers load on first use
    if name in ("DPOConfig", "train_dpo"):
        from preftune.methods import dpo

        return getattr(dpo, name)
    if name in ("RewardConfig", "train_reward"):
        from preftune.methods import reward

        return getattr(reward, name)
    if name == "score":
        from preftune.rewards.reward_model import score

        return score
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
