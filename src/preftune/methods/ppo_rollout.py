"""PPO's rollouts: the policy with its value head, one round's samples and their per-token values,
and the step source that serves the loop minibatches of the current round.

Per-token values live as flat ``[N]`` tensors in the order of a batch's scored positions
(:func:`from_rows`), or one ``[len_i]`` tensor per sample (:func:`to_rows`); the PPO math of
:mod:`preftune.losses.ppo` runs on them padded to ``[B, T]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from preftune.data.batching import ForwardBatch, collate
from preftune.data.images import ImageInputs
from preftune.data.rows import Prompt, as_prompt
from preftune.data.tokenize import TokenizedPair, single_sequence
from preftune.engine.accelerator import all_shares
from preftune.engine.steps import StepBatches, step_indices
from preftune.losses.ppo import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    token_rewards,
)
from preftune.methods.ppo_config import PPOConfig
from preftune.model.generation import sample_continuations
from preftune.model.logps import SequenceScorer
from preftune.rewards.judges import RewardFunction, call_reward


# -- policy + value head ------------------------------------------------------------------
class PolicyValue(nn.Module):
    """The policy scorer and a linear value head on its hidden states: one forward gives, at the
    ``N`` scored positions, ``log pi(y_t | x, y_<t)`` ``[N]`` and ``V_t`` ``[N]`` (the value of
    the state before y_t)."""

    def __init__(self, scorer: SequenceScorer):
        super().__init__()
        self.scorer = scorer
        # an image-text model's config keeps its language model's size in text_config
        self.value_head = nn.Linear(scorer.model.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def model(self) -> nn.Module:
        return self.scorer.model

    def forward(self, batch: ForwardBatch) -> tuple[Tensor, Tensor]:
        hidden = self.scorer.scored_hidden(batch)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return self.scorer.token_logps(hidden, batch.score_target), values


def per_sequence(x: Tensor, batch: ForwardBatch) -> Tensor:
    """Sum ``[N]`` token values into ``[B]`` sequences."""
    return x.new_zeros(batch.num_pairs).index_add(0, batch.score_sequence, x)


def _order(batch: ForwardBatch) -> Tensor:
    """Positions of the ``N`` scored tokens grouped by sequence, each sequence's tokens in order."""
    return torch.argsort(batch.score_sequence, stable=True)


def to_rows(flat: Tensor, batch: ForwardBatch) -> list[Tensor]:
    """``[N]`` token values -> one ``[len_i]`` tensor per sequence."""
    counts = torch.bincount(batch.score_sequence, minlength=batch.num_pairs).tolist()
    return list(flat[_order(batch)].split(counts))


def from_rows(rows: Sequence[Tensor], batch: ForwardBatch) -> Tensor:
    """Inverse of :func:`to_rows`: per-sequence values -> ``[N]`` in the batch's token order."""
    flat = torch.empty(batch.score_sequence.shape[0], dtype=rows[0].dtype)
    flat[_order(batch)] = torch.cat(list(rows))
    return flat


# -- rollouts -----------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """A minibatch of rollout samples: the forward batch and ``[N]`` per-token rollout values."""

    forward: ForwardBatch
    old_logps: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor

    @property
    def num_real_tokens(self) -> int:
        return self.forward.num_real_tokens

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(self.forward.to(device), *(t.to(device) for t in (
            self.old_logps, self.old_values, self.advantages, self.returns)))


@dataclass
class Rollout:
    """One round's samples (each with the index of its prompt) and their per-token old log-probs,
    values, advantages and returns."""

    round: int
    samples: list[TokenizedPair]
    old_logps: list[Tensor]
    old_values: list[Tensor]
    advantages: list[Tensor]
    returns: list[Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_index: list[int] = field(default_factory=list)

    _PER_TOKEN = ("old_logps", "old_values", "advantages", "returns")

    def batch(self, indices: Sequence[int], pad_id: int, images: ImageInputs | None = None) -> RolloutBatch:
        forward = collate([self.samples[j] for j in indices], indices, layout="prefix_shared", pad_id=pad_id,
                          images=images)
        return RolloutBatch(forward, *(from_rows([getattr(self, k)[j] for j in indices], forward)
                                       for k in self._PER_TOKEN))

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (checkpoints read it with ``torch.load(weights_only=True)``)."""
        lengths = lambda seqs: torch.tensor([len(s) for s in seqs], dtype=torch.long)  # noqa: E731
        prompts, completions = [s.prompt_ids for s in self.samples], [s.chosen_ids for s in self.samples]
        return {"round": self.round, "metrics": dict(self.metrics),
                "prompt_index": torch.tensor(self.prompt_index, dtype=torch.long),
                "prompt_ids": torch.tensor([t for p in prompts for t in p]),
                "prompt_lengths": lengths(prompts),
                "completion_ids": torch.tensor([t for c in completions for t in c]),
                "completion_lengths": lengths(completions),
                **{k: torch.cat(getattr(self, k)) for k in self._PER_TOKEN}}

    @classmethod
    def from_state(cls, state: dict[str, Any], prompts: Sequence[Prompt] = (),
                   images: ImageInputs | None = None) -> Rollout:
        """The rollout of :meth:`state_dict`; each sample's images from its prompt in ``prompts``."""
        split = lambda key, lengths: state[key].split(lengths.tolist())  # noqa: E731
        c_len = state["completion_lengths"]
        index = state["prompt_index"].tolist() if "prompt_index" in state else []
        ids = list(zip(split("prompt_ids", state["prompt_lengths"]), split("completion_ids", c_len)))
        samples = [single_sequence(p.tolist(), c.tolist(), prompts[index[n]].images if index else (), images)
                   for n, (p, c) in enumerate(ids)]
        return cls(state["round"], samples, *(list(split(k, c_len)) for k in cls._PER_TOKEN),
                   metrics=dict(state["metrics"]), prompt_index=index)


class TokenReference:
    """Reference log-probs per scored token: a frozen copy, or the LoRA policy with adapters off."""

    def __init__(self, scorer: SequenceScorer, adapter: bool):
        self.scorer, self.adapter = scorer, adapter

    @torch.no_grad()
    def __call__(self, batch: ForwardBatch) -> Tensor:
        with self.scorer.model.disable_adapter() if self.adapter else nullcontext():
            return self.scorer.token_logps(self.scorer.scored_hidden(batch), batch.score_target)

    @torch.no_grad()
    def ema_update(self, policy: nn.Module, alpha: float) -> None:
        """ref <- (1 - alpha) ref + alpha policy, parameter by parameter."""
        for ref, new in zip(self.scorer.model.parameters(), policy.parameters(), strict=True):
            ref.lerp_(new.detach().to(ref.dtype), alpha)


def _minibatches(samples: int, size: int, num_processes: int) -> int:
    """Minibatches of one pass over a round's ``samples``: ``size`` each, the last one taking the
    rest; a remainder too small to give every process a sample joins the one before it."""
    full, rest = divmod(samples, size)
    return max(1, full + (rest >= num_processes))


def _locate(step: int, round_steps: Sequence[int]) -> tuple[int, int]:
    """(round, step within the round) of the run's optimizer step ``step``."""
    for rnd, count in enumerate(round_steps):
        if step < count:
            return rnd, step
        step -= count
    raise IndexError(f"step beyond the run's {sum(round_steps)} steps")


class RolloutSteps:
    """The loop's step source for PPO: the run's steps are the rounds' steps back to back
    (:meth:`round_steps`); a round is sampled when its first step is asked for."""

    #: the summary's word for a rollout sample
    noun = "items"

    def __init__(self, config: PPOConfig, prompts: Sequence[str | Prompt], policy: PolicyValue,
                 reference: TokenReference, reward_fn: RewardFunction, tokenizer: Any,
                 images: ImageInputs | None = None):
        self.config, self.policy, self.reference = config, policy, reference
        self.prompts = [as_prompt(p) for p in prompts]
        self.reward_fn, self.tokenizer, self.images = reward_fn, tokenizer, images
        self.controller = make_kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)
        self.rollout: Rollout | None = None

    @property
    def num_items(self) -> None:
        """None: the samples are drawn round by round, not a fixed set."""
        return None

    def fingerprint(self) -> str:
        """A hash of the prompts: the run identity's ``train_data``."""
        import hashlib

        parts = [p.text + "".join(f"\x01{r.digest}" for r in p.images) for p in self.prompts]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def round_steps(self, num_processes: int) -> list[int]:
        """Optimizer steps of each round: ``ppo_epochs`` passes over its samples in minibatches
        (the last one of a pass may be smaller; none is empty)."""
        size = self.config.minibatch_size(num_processes)
        return [self.config.ppo_epochs * _minibatches(n, size, num_processes)
                for n in self.config.round_sizes(len(self.prompts))]

    def total_steps(self, num_processes: int) -> int:
        return sum(self.round_steps(num_processes))

    def step(self, step: int, process_index: int, num_processes: int) -> StepBatches:
        cfg = self.config
        rnd, k = _locate(step, self.round_steps(num_processes))
        if self.rollout is None or self.rollout.round != rnd:
            self.rollout = self.collect(rnd, process_index, num_processes)
        n = len(self.rollout.samples)
        size = cfg.minibatch_size(num_processes)
        count = _minibatches(n, size, num_processes)
        epoch, m = divmod(k, count)
        seed = cfg.seed + 7919 * rnd + 104729 * epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        idx = perm[m * size : n if m == count - 1 else (m + 1) * size].tolist()  # the last takes the rest
        share = math.ceil(len(idx) / num_processes)
        mine = idx[process_index * share : (process_index + 1) * share]
        pad = self.tokenizer.pad_token_id
        batches = [self.rollout.batch(mine[i : i + cfg.batch_size], pad, self.images)
                   for i in range(0, len(mine), cfg.batch_size)]
        units = float(sum(len(self.rollout.samples[j].chosen_ids) for j in idx))
        return StepBatches(batches, units, {**self.rollout.metrics, "ppo/epoch": float(epoch)})

    @torch.no_grad()
    def collect(self, rnd: int, process_index: int = 0, num_processes: int = 1) -> Rollout:
        """Sample, score and evaluate round ``rnd`` (see the module docstring, steps 1-4). Under
        several processes each samples and judges its share of the sampler's batches, and every
        process gets the whole round (the samples one process would draw), so all train on it."""
        cfg = self.config
        if cfg.reference_ema is not None and rnd > 0:
            self.reference.ema_update(self.policy.model, cfg.reference_ema)
        samples, raw, prompt_index = self._sample_and_judge(rnd, process_index, num_processes)
        lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
        stopped = torch.tensor([s.stopped for s in samples], dtype=torch.float32)
        scores = self._score(raw, lengths, stopped)
        pairs = [single_sequence(s.prompt_ids, s.completion_ids, s.images, self.images) for s in samples]
        logps, values, ref_logps, entropy = self._token_values(pairs)
        pad = lambda rows: pad_sequence(rows, batch_first=True)  # noqa: E731
        mask = pad([torch.ones(len(r)) for r in logps])
        logp, value, ref = pad(logps), pad(values), pad(ref_logps)
        kl = kl_penalty(logp, ref, cfg.kl_estimator) * mask
        kl_coef = self.controller.value
        rewards = token_rewards(scores, kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, value, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        # k1 summed: the sequence KL estimate, whatever the penalty
        sequence_kl = ((logp - ref) * mask).sum(1)
        self.controller.update(float(sequence_kl.mean()), len(samples))
        metrics = {
            "env/reward": float(raw.mean()), "env/score": float(scores.mean()),
            "objective/kl": float(sequence_kl.mean()),
            "objective/kl_penalty": float((kl * kl_coef).sum(1).mean()),
            "objective/kl_coef": kl_coef, "objective/entropy": float(masked_mean(pad(entropy), mask)),
            "val/explained_variance": explained_variance(value, returns, mask),
            "val/mean": float(masked_mean(value, mask)), "rollout/length": float(lengths.mean()),
            "rollout/stopped": float(stopped.mean()), "rollout/round": float(rnd),
        }
        rows = lambda t: [t[i, : len(logps[i])].clone() for i in range(len(logps))]  # noqa: E731
        return Rollout(rnd, pairs, logps, values, rows(advantages), rows(returns), metrics, prompt_index)

    def _sample_and_judge(self, rnd: int, process_index: int,
                          num_processes: int) -> tuple[list[Any], Tensor, list[int]]:
        """Steps 1 and 2: one completion of the current policy for each of round ``rnd``'s prompts,
        its reward ``[B]`` and its prompt's index; this process draws and judges its share
        (:func:`sample_continuations`'s ``processes``), then every process gets all of them, in prompt
        order."""
        cfg, model = self.config, self.policy.model
        indices = step_indices(len(self.prompts), cfg.rollout_batch_size, cfg.seed, rnd)
        was_training = model.training
        prompts = [self.prompts[i] for i in indices]
        groups = sample_continuations(model, self.tokenizer, prompts, num_samples=1,
                                      temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=max(cfg.batch_size, 16), seed=cfg.seed + 7919 * rnd,
                                      max_prompt_tokens=cfg.max_prompt_length,
                                      processes=(process_index, num_processes), images=self.images)
        model.train(was_training)
        mine = [(i, group[0]) for i, group in enumerate(groups) if group]
        share, error = [], None
        try:
            rewards = self._judge([prompts[i] for i, _ in mine], [s for _, s in mine]) if mine else []
            share = [(i, sample, r) for (i, sample), r in zip(mine, rewards)]
        except Exception as e:  # noqa: BLE001 - a judge's error on one process stops them all
            error = e
        judged = sorted(all_shares(share, error), key=lambda item: item[0])
        return ([sample for _, sample, _ in judged], torch.tensor([r for _, _, r in judged]),
                [indices[i] for i, _, _ in judged])

    def _judge(self, prompts: Sequence[Prompt], samples: Sequence[Any]) -> list[float]:
        """Step 2: the reward of each sample (its prompt's images and columns passed as the reward takes
        them); a wrong count or a value that is not finite is an error."""
        raw = call_reward(self.reward_fn, prompts, [s.text for s in samples], what="reward_fn")
        if len(raw) != len(samples) or not all(math.isfinite(r) for r in raw):
            raise ValueError(f"reward function returned {len(raw)} values for {len(samples)} samples, "
                             "or a value that is not finite")
        return raw

    def _score(self, raw: Tensor, lengths: Tensor, stopped: Tensor) -> Tensor:
        """The score s ``[B]`` of each sample: its reward ``raw`` less ``length_penalty`` x its
        ``lengths`` and, unless ``stopped``, ``missing_eos_penalty``."""
        cfg = self.config
        scores = raw - cfg.length_penalty * lengths
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (1 - stopped)
        return scores

    def _token_values(self, pairs: Sequence[TokenizedPair]) -> tuple[list[Tensor], ...]:
        """Step 3, one no-grad pass: per sample ``[len_i]`` rows of the policy's log-probs, the values,
        the reference's log-probs and the policy's entropy (on the CPU, in fp32)."""
        scorer, value_head = self.policy.scorer, self.policy.value_head
        device = next(self.policy.model.parameters()).device
        logps: list[Tensor] = []
        values: list[Tensor] = []
        ref_logps: list[Tensor] = []
        entropy: list[Tensor] = []
        for start in range(0, len(pairs), self.config.batch_size):
            batch = collate(pairs[start : start + self.config.batch_size], layout="prefix_shared",
                            pad_id=self.tokenizer.pad_token_id, images=self.images).to(device)
            hidden = scorer.scored_hidden(batch)
            ent = torch.cat([entropy_from_logits(scorer.logits(h)) for h in hidden.split(256)])
            values_flat = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1)
            for out, flat in ((logps, scorer.token_logps(hidden, batch.score_target)),
                              (values, values_flat.float()), (ref_logps, self.reference(batch)),
                              (entropy, ent)):
                out += [t.float().cpu() for t in to_rows(flat, batch)]
        return logps, values, ref_logps, entropy

    def state_dict(self) -> dict[str, Any]:
        """The KL controller and the round being trained on, so a resume mid-round continues with
        the same samples."""
        state: dict[str, Any] = {"kl_controller": self.controller.state_dict()}
        if self.rollout is not None:
            state["rollout"] = self.rollout.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["kl_controller"])
        self.rollout = (Rollout.from_state(state["rollout"], self.prompts, self.images) if "rollout" in state
                        else None)
