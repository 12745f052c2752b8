"""SFT: the loss is the mean NLL of the trained tokens, masks hold token by token, the run learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LOGP_RTOL, assert_weights_close, crash_at, save_tiny_model, tiny_llama, tiny_tokenizer
from preftune.data.batching import collate
from preftune.data.formats import SFTExample
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.methods.sft import SFTObjective, train_sft, trained_tokens
from preftune.model.logps import SequenceScorer


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_sft(path, n: int = 24):
    """A learnable task: the assistant always answers the user's word shifted by one."""
    rows = []
    for i in range(n):
        a, b = i % 20, (i * 7) % 20
        rows.append({"messages": [msg("user", f"w{a}"), msg("assistant", f"w{a + 1} w{a + 2}"),
                                  msg("user", f"w{b}"), msg("assistant", f"w{b + 1} w{b + 2}")]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(tmp, **overrides):
    if not (tmp / "model").exists():
        save_tiny_model(tmp / "model")
    write_sft(tmp / "sft.jsonl")
    config = {"model": str(tmp / "model"), "train_file": str(tmp / "sft.jsonl"),
              "output_dir": str(tmp / "out"), "batch_size": 8, "max_steps": 6, "learning_rate": 3e-3,
              "logging_steps": 1, "progress_bar": False}
    config.update(overrides)
    return config


@pytest.mark.parametrize("layout", ["prefix_shared", "packed", "padded"])
def test_loss_is_the_nll_of_exactly_the_assistant_tokens(layout):
    """The scored positions are the assistant tokens (content, end of turn, EOS) and nothing else;
    the summed NLL equals a plain full-logits forward masked by hand."""
    tok = tiny_tokenizer()
    example = SFTExample("<user> w1 <assistant> ", (("w2 w3", True), (" <user> w4 <assistant> ", False),
                                                    ("w5", True)))
    (pair,) = PairTokenizer(tok, Budgets()).tokenize_sft([example]).pairs
    user, assistant = tok.convert_tokens_to_ids(["<user>", "<assistant>"])
    assert pair.chosen_ids == (5, 6, user, 7, assistant, 8, 2)
    assert pair.chosen_mask == (True, True, False, False, False, True, True)
    batch = collate([pair], layout=layout, pad_id=0)
    assert batch.score_target.tolist() == [5, 6, 8, 2]
    model = tiny_llama()
    ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    n_p = len(pair.prompt_ids)
    expected = -sum(float(logp[n_p - 1 + k, t]) for k, t in enumerate(pair.chosen_ids) if pair.chosen_mask[k])
    out = SFTObjective(SequenceScorer(model), tok).loss(batch)
    assert float(out.loss[0].detach()) == pytest.approx(expected, rel=LOGP_RTOL)  # a sum of fp32 log-probs
    assert trained_tokens(pair) == 4.0 == float(out.metrics["tokens"][0])


def test_sft_lowers_nll_and_logs_perplexity(tmp_path):
    run = train_sft(sft_config(tmp_path, max_steps=30, logging_steps=5, learning_rate=1e-2,
                               eval_file=str(tmp_path / "sft.jsonl")))
    first, last = run.train.history[0], run.train.history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]))
    evaluated = run.train.eval_history[-1]
    assert evaluated["eval/perplexity"] == pytest.approx(math.exp(evaluated["eval/loss"]))
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens"):
        assert key in last
    # the output is a model directory DPO takes
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run.train.final_dir)
    assert (run.train.final_dir / "tokenizer.json").exists()


def test_loss_is_a_mean_per_token_over_the_whole_step(tmp_path):
    """Examples weigh their trained tokens: accumulation 4 x 2 equals one batch of 8."""
    big = train_sft(sft_config(tmp_path, max_steps=2, output_dir=str(tmp_path / "a")))
    small = train_sft(sft_config(tmp_path, max_steps=2, batch_size=2, gradient_accumulation_steps=4,
                                 output_dir=str(tmp_path / "b")))
    # mean log-probs by other batches: close, not equal
    for a, b in zip(big.train.history, small.train.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOGP_RTOL)
    wa, wb = (load_file(str(r.train.final_dir / "model.safetensors")) for r in (big, small))
    assert_weights_close(wa, wb, lr=3e-3)
    # step 1's loss = (summed NLL of its examples) / (their trained tokens), under the initial weights
    from preftune.engine.steps import step_indices
    from preftune.model.load import load_model

    pairs = big.data.train.pairs
    scorer = SequenceScorer(load_model(str(tmp_path / "model")))
    idx = step_indices(len(pairs), 8, 0, 0)
    with torch.no_grad():
        nll = -scorer(collate([pairs[j] for j in idx], pad_id=0)).chosen
    tokens = sum(trained_tokens(pairs[j]) for j in idx)
    # sums of fp32 log-probs, other batches
    assert big.train.history[0]["loss"] == pytest.approx(float(nll.sum()) / tokens, rel=LOGP_RTOL)
    # not per example
    assert float(nll.sum()) / len(idx) != pytest.approx(big.train.history[0]["loss"], rel=1e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_resume_gives_the_same_weights(tmp_path, lora):
    settings = dict(max_steps=6, batch_size=4, save_steps=2, lora=lora)
    whole = train_sft(sft_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))

    with pytest.raises(KeyboardInterrupt):
        train_sft(sft_config(tmp_path, output_dir=str(tmp_path / "cut"), **settings), callbacks=[crash_at(5)])
    resumed = train_sft(sft_config(tmp_path, output_dir=str(tmp_path / "cut"), resume=True, **settings))
    a, b = (load_file(str(r.train.final_dir / "model.safetensors")) for r in (whole, resumed))
    for k in a:  # bitwise: the same process, thread count, kernels and batches, resumed or not
        assert torch.equal(a[k], b[k]), k


def test_preference_file_trains_on_the_chosen_side(tmp_path):
    from helpers import tensorboard_scalars, write_pairs

    write_pairs(tmp_path / "pairs.jsonl", n=16)
    run = train_sft(sft_config(tmp_path, train_file=str(tmp_path / "pairs.jsonl"), max_steps=2,
                               logging_steps=1, report_to="tensorboard"))
    logged = tensorboard_scalars(Path(run.train.output_dir) / "tensorboard")  # SFT reports as DPO does
    assert logged["perplexity"] == pytest.approx({r["step"]: r["perplexity"] for r in run.train.history})
    assert len(run.data.train.pairs) == 16 and all(p.rejected_ids == () for p in run.data.train.pairs)


def test_cli_sft(tmp_path, capsys):
    from preftune.cli import main

    cfg = sft_config(tmp_path, max_steps=2)
    args = ["sft", *[x for k, v in cfg.items()
                     for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]]
    assert main(args) == 0
    assert "perplexity" in capsys.readouterr().out
