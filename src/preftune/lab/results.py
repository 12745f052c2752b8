"""The figures of one policy evaluation: pi_theta against pi_ref on held-out prompts.

This is the result type the report (:mod:`preftune.lab.report`) shows; the experiments in
:mod:`preftune.lab` fill it in. It depends on nothing above ``eval/``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PolicyEvaluation"]


@dataclass
class PolicyEvaluation:
    """Held-out figures of a trained policy pi_theta against its reference pi_ref.

    Rewards are the ground truth r*(x, y) (e.g. VADER compound in [-1, 1]), averaged over the samples
    y of each model; ``*_stderr`` = s / sqrt(n), s the sample standard deviation of the n values.
    ``kl`` = mean over samples y ~ pi_theta of log pi_theta(y|x) - log pi_ref(y|x) (nats per sequence);
    ``kl_per_token`` divides the summed log-ratio by the summed generated tokens.
    """

    reward_before: float  # mean r* of pi_ref samples
    reward_before_stderr: float
    reward_after: float  # mean r* of pi_theta samples
    reward_after_stderr: float
    win_rate: float  # P(r*(y_theta) > r*(y_ref)) + 1/2 P(tie), same prompt and seed
    kl: float  # KL(pi_theta || pi_ref) per sequence, nats
    kl_stderr: float
    kl_per_token: float
    heldout_accuracy: float  # implicit-reward accuracy on held-out labelled pairs
    train_accuracy: float  # same, on the last logging window of training
    label_agreement: float  # fraction of training labels that agree with r* (ties excluded)
    num_train_pairs: int
    num_eval_pairs: int
    num_eval_samples: int  # held-out samples per model
    wall_time_s: float
    stage_times_s: dict[str, float] = field(default_factory=dict)
    output_dir: str = ""
    files: dict[str, str] = field(default_factory=dict)  # role -> path of each file written

    def to_json(self) -> str:
        """All fields as an indented JSON object (the ``result.json`` of a run)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PolicyEvaluation:
        """Inverse of :meth:`to_json`."""
        data: dict[str, Any] = json.loads(text)
        return cls(**data)
