"""Shared test helpers: tiny models, plain reference computations, tolerances, the cpu_linear switch."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.data.batching import ForwardBatch
from preftune.data.tokenize import TokenizedPair
from preftune.losses.base import SequenceLogps
from preftune.model.logps import sum_by_sequence

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(vocab: int = 64, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def random_pairs(n: int, vocab: int = 64, seed: int = 0, max_len: int = 12) -> list[TokenizedPair]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len)))
        c = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len)))
        r = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len)))
        out.append(TokenizedPair(p, c, r, 1.0))
    return out


def all_lengths_differ() -> list[TokenizedPair]:
    """Every prompt, chosen and rejected length in the batch is different."""
    out, k = [], 3
    for i in range(4):
        p, c, r = 1 + 3 * i, 2 + 3 * i, 3 + 3 * i
        out.append(TokenizedPair(tuple(range(k, k + p)), tuple(range(5, 5 + c)), tuple(range(7, 7 + r))))
        k += 1
    return out


def plain_logps(model, batch: ForwardBatch) -> SequenceLogps:
    """The plain way: full logits of a padded batch, log-softmax, gather, sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    token_logps = logp[batch.score_index, batch.score_target]
    return sum_by_sequence(token_logps, batch.score_sequence, 2 * batch.num_pairs)


def plain_weighted_backward(pairs: list[TokenizedPair]):
    """The plain padded forward and the backward of ``sum(w * logps)`` on a fresh tiny Llama:
    (weights ``[2B]``, log-probs, gradients by parameter name)."""
    from preftune.data.batching import collate

    weights = torch.linspace(-1, 1, 2 * len(pairs))
    model = tiny_llama().train()
    expected = plain_logps(model, collate(pairs, layout="padded"))
    (torch.cat([expected.chosen, expected.rejected]) * weights).sum().backward()
    return weights, expected, {n: p.grad for n, p in model.named_parameters()}


# -- tolerances --------------------------------------------------------------------------------------
# Two mathematically equal fp32 computations (another layout, the chunked head, checkpointing, oneDNN
# instead of BLAS, compiled layers, other batches, another thread count) round differently: by how
# much depends on the kernels, so a tolerance is set by the arithmetic, not by what one machine shows.

#: fp32 machine epsilon, 2**-23 = 1.19e-7: one rounding of an fp32 number, relative to its size.
FP32_EPS = torch.finfo(torch.float32).eps
#: Per-sequence sums of fp32 token log-probs. Each token's log-prob carries a few eps of the logits'
#: size (reordered sums in the decoder and the head); a sum of n such terms, all <= 0 (no cancellation),
#: carries sqrt(n) (typical) to n (worst case) times that of |sum|: for n ~ 10-25 tokens up to ~3e-6,
#: seen 1-3 ulps (<= 2.5e-7, issue 24). 1e-5 (~84 eps) is safely above that and ~1000x below what a
#: wrong mask, position or target does to a sum (> 1e-2 relative).
LOGP_RTOL = 1e-5
#: Parameter gradients of ``sum(w * logps)`` (|w| <= 1): each element sums N ~ 100-200 per-token
#: contributions of both signs, so its rounding error scales with the size of those contributions, not
#: with the element: sqrt(N) eps ~ 2e-6 typical, N eps ~ 2e-5 worst case of that size; seen <= 7.4e-7.
#: The size is taken as the parameter's largest gradient element, and at least 1 (one token's weight):
#: a gradient that vanishes by symmetry (a key bias under softmax) is a cancelling sum of such terms.
GRAD_RTOL = 1e-5
#: Logged losses of two runs that round differently (DPO-type: log-sigmoid of beta times margins of
#: summed log-probs, averaged over the batch). A margin of sums of ~50 nats that is a few ulps (~1e-5)
#: off moves a loss of ~0.7 by <= beta * 1e-5 / 2 = 5e-7 (beta 0.1): <= 7e-7 relative, seen <= 5e-8;
#: 1e-5 of the loss's size is well above that and far below the ~1e-3 a wrongly scored or weighted
#: pair makes.
LOSS_RTOL = 1e-5
#: Weights after a few AdamW steps of learning rate ``lr`` by two routes that round differently: Adam
#: moves an element by ~lr per step whatever the gradient's size, and a gradient that differs in its
#: last bits moves it by ~lr * dg / (|g| + 1e-8), which is sizeable only where |g| is near Adam's eps.
#: 1% of one step (seen <= 7e-4 of a step) still fails for a dropped or wrongly weighted micro-batch,
#: which turns the update's direction and moves elements by O(lr).
ADAM_STEP_FRACTION = 1e-2


def assert_losses_close(got, expected, rtol: float = LOSS_RTOL) -> None:
    """Two lists of logged losses (one per step), each to ``rtol`` of the largest (:data:`LOSS_RTOL`)."""
    got, expected = torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


def assert_logps_close(got, expected, rtol: float = LOGP_RTOL) -> None:
    """Summed log-probs (``SequenceLogps``: chosen and rejected; or two tensors) to ``rtol`` of their
    size (:data:`LOGP_RTOL`). The floor is ``rtol`` of the batch's largest |sum|: the sequences of a
    batch share the matmuls whose rounding makes the error, so a short sequence's small sum is held to
    the same absolute bound as its longer neighbours, not to a tighter one."""
    if isinstance(expected, SequenceLogps):
        pairs = [(got.chosen, expected.chosen, "chosen"), (got.rejected, expected.rejected, "rejected")]
    else:
        pairs = [(got, expected, "log-probs")]
    scale = max((float(e.detach().abs().max()) for _, e, _ in pairs if e.numel()), default=0.0)
    for g, e, name in pairs:
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_grads_close(got: dict, expected: dict, rtol: float = GRAD_RTOL) -> None:
    """Gradients by parameter name, each to ``rtol`` of its element plus ``rtol`` of the larger of 1 and
    its largest element (:data:`GRAD_RTOL`); the names of ``expected`` are compared."""
    for name, e in expected.items():
        scale = max(1.0, float(e.abs().max()) if e.numel() else 0.0)
        torch.testing.assert_close(got[name], e, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_weights_close(a: dict, b: dict, lr: float) -> None:
    """Two trained state dicts: the same keys, each weight within :data:`ADAM_STEP_FRACTION` of one
    AdamW step of learning rate ``lr``."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ADAM_STEP_FRACTION * lr, rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")


def assert_same_logps_and_grads(got: SequenceLogps, grads: dict, expected: SequenceLogps,
                                expected_grads: dict):
    """Per-sequence log-probs (:func:`assert_logps_close`) and gradients (:func:`assert_grads_close`)."""
    assert_logps_close(got, expected)
    assert_grads_close(grads, expected_grads)


# -- cpu_linear for the whole suite ------------------------------------------------------------------
#: ``PREFTUNE_TEST_CPU_LINEAR=torch`` (or ``onednn``) runs the suite with ``cpu_linear: auto`` resolved
#: to that value instead of auto's own choice (oneDNN on an x86 CPU).
CPU_LINEAR_ENV = "PREFTUNE_TEST_CPU_LINEAR"


def apply_test_cpu_linear() -> str | None:
    """Where :data:`CPU_LINEAR_ENV` is set, make ``cpu_linear: auto`` on the CPU resolve to its value
    in this process (``preftune.hardware.cpu_linear.resolve`` wrapped; explicit settings and other devices
    unchanged; the original stays at ``resolve.__wrapped__``). Called by conftest.py for the test session
    and by the worker scripts the tests launch, which inherit the environment. Returns the value."""
    value = os.environ.get(CPU_LINEAR_ENV, "").strip()
    if not value:
        return None
    if value not in ("torch", "onednn"):
        raise ValueError(f"{CPU_LINEAR_ENV} must be torch or onednn, got {value!r}")
    from preftune.hardware import cpu_linear

    original = getattr(cpu_linear.resolve, "__wrapped__", cpu_linear.resolve)

    @functools.wraps(original)
    def resolve(setting: str, device_type: str, **kwargs: bool) -> tuple[str, str]:
        if setting == "auto" and device_type == "cpu":
            return original(value, device_type)[0], f"auto set to {value} by {CPU_LINEAR_ENV}"
        return original(setting, device_type, **kwargs)

    cpu_linear.resolve = resolve
    return value


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer over ``<unk> <s> </s> w0..w60`` plus role tags; BOS added, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(58)] + ["<user>", "<assistant>", "<system>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A tiny Llama + word-level tokenizer saved as a Hugging Face directory."""
    tiny_llama(vocab=64, seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def words(rng: random.Random, n: int, lo: int = 0, hi: int = 58) -> str:
    return " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(n))


def write_pairs(path: Path, n: int = 32, seed: int = 0) -> Path:
    """A learnable toy task: chosen completions use low words, rejected ones high words."""
    import json

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": words(rng, rng.randint(2, 6)),
                   "chosen": " " + words(rng, rng.randint(2, 5), 0, 20),
                   "rejected": " " + words(rng, rng.randint(2, 5), 30, 58)}
            f.write(json.dumps(row) + "\n")
    return path


def base_config(tmp: Path, **overrides) -> dict:
    """A fast DPO config on the tiny model and toy data in ``tmp``."""
    if not (tmp / "model").exists():
        save_tiny_model(tmp / "model")
    if not (tmp / "train.jsonl").exists():
        write_pairs(tmp / "train.jsonl")
    config = {"model": str(tmp / "model"), "train_file": str(tmp / "train.jsonl"),
              "output_dir": str(tmp / "out"), "batch_size": 8, "max_steps": 6, "learning_rate": 1e-3,
              "logging_steps": 1, "progress_bar": False, "reference_cache_dir": None}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def crash_at(step: int):
    """A training callback that raises KeyboardInterrupt once step ``step`` is done (an interrupted run)."""
    def callback(done, _metrics):
        if done == step:
            raise KeyboardInterrupt

    return callback


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """The scalars of the TensorBoard event files under ``directory``: tag -> {step: value} (a resumed
    run's purged events are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def image_model_logps(model, batch, pixel_inputs: dict) -> torch.Tensor:
    """``[2B]`` summed log-probs of a padded batch by the image-text model's own forward (its own
    placeholder scatter, from ``pixel_inputs`` as its processor gives them): logits, log-softmax, gather."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **pixel_inputs).logits
    token = logits.log_softmax(-1).reshape(-1, logits.shape[-1])[batch.score_index, batch.score_target]
    return token.new_zeros(2 * batch.num_pairs).index_add(0, batch.score_sequence, token)


def logps_and_grads(model, logps_fn, weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``logps_fn()`` (float64, detached) and the gradients of ``sum(weights * logps)`` by parameter
    name; the model's gradients are zeroed after."""
    logps = logps_fn().double()
    (logps * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return logps.detach(), grads


def chosen_then_rejected(out) -> torch.Tensor:
    """``[2B]``: a ``SequenceLogps``'s chosen, then rejected, log-probs (the padded batch's row order)."""
    return torch.cat([out.chosen, out.rejected])
