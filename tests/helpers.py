"""Shared test helpers: tiny models, plain reference computations."""

from __future__ import annotations

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


def assert_same_logps_and_grads(got: SequenceLogps, grads: dict, expected: SequenceLogps, expected_grads: dict):
    """Per-sequence log-probs to 1e-5, gradients to 1e-5 + 1e-4 relative, parameter by parameter."""
    torch.testing.assert_close(got.chosen, expected.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, expected.rejected, atol=1e-5, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


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
            row = {"prompt": words(rng, rng.randint(2, 6)), "chosen": " " + words(rng, rng.randint(2, 5), 0, 20),
                   "rejected": " " + words(rng, rng.randint(2, 5), 30, 58)}
            f.write(json.dumps(row) + "\n")
    return path


def base_config(tmp: Path, **overrides) -> dict:
    """A fast DPO config on the tiny model and toy data in ``tmp``."""
    if not (tmp / "model").exists():
        save_tiny_model(tmp / "model")
    if not (tmp / "train.jsonl").exists():
        write_pairs(tmp / "train.jsonl")
    config = {"model": str(tmp / "model"), "train_file": str(tmp / "train.jsonl"), "output_dir": str(tmp / "out"),
              "batch_size": 8, "max_steps": 6, "learning_rate": 1e-3, "logging_steps": 1, "progress_bar": False,
              "reference_cache_dir": None}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def crash_at(step: int):
    """A training callback that raises KeyboardInterrupt once step ``step`` is done (an interrupted run)."""
    def callback(done, _metrics):
        if done == step:
            raise KeyboardInterrupt

    return callback
