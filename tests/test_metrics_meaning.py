"""Issue 14: metrics that mean what they say (KTO per class), the reward model's saved budgets in
score(), conversational KTO rows, and never two EOS tokens."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import CHAT_TEMPLATE, base_config, tiny_tokenizer, words
from preftune.data.formats import PreferencePair, SFTExample, UnpairedExample
from preftune.data.tokenize import Budgets, PairTokenizer
from preftune.losses import LossInputs, PreferenceLoss, SequenceLogps
from preftune.losses.metrics import preference_metrics, unpaired_derived, unpaired_metrics
from preftune.methods.dpo import train_dpo


def logps(chosen, rejected) -> SequenceLogps:
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    return SequenceLogps(c, r, torch.ones_like(c), torch.ones_like(r))


def test_kto_metrics_per_class_by_hand():
    beta = 0.5
    policy = logps([-2.0, -3.0, -1.0, -4.0, -6.0], [-5.0, -5.0, -5.0, -5.0, -5.0])
    ref = logps([-2.5, -2.0, -2.0, -3.0, -6.5], [-5.5, -4.0, -5.0, -5.0, -5.0])
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    out = PreferenceLoss({"kto": 1.0}, {"beta": beta})(LossInputs(policy, ref, label))
    metrics = unpaired_metrics(out, policy, label)
    assert not {"dpo/grad_weight", "rewards/margins", "rewards/accuracies", "logps/rejected"} & set(metrics)
    # the loop's row: each metric's sum over rows divided by the units (5 rows); then the objective divides
    row = unpaired_derived({k: float(v.sum()) / 5 for k, v in metrics.items()})
    # by hand: r = beta (log pi - log pi_ref) = [0.25, -0.5, 0.5, -0.5, 0.25]; desirable rows 0, 2, 4
    assert row["rewards/desirable"] == pytest.approx((0.25 + 0.5 + 0.25) / 3)
    assert row["rewards/undesirable"] == pytest.approx((-0.5 - 0.5) / 2)
    assert row["logps/desirable"] == pytest.approx((-2.0 - 1.0 - 6.0) / 3)
    assert row["logps/undesirable"] == pytest.approx((-3.0 - 4.0) / 2)
    # z0 = max(0, mean(policy.rejected - ref.rejected)) = max(0, (0.5 - 1 + 0 + 0 + 0) / 5) = 0
    assert float(metrics["kto/kl"].mean()) == 0.0
    ref_kl = logps([-2.5, -2.0, -2.0, -3.0, -6.5], [-6.0, -6.0, -5.5, -5.0, -5.0])  # z0 = (1 + 1 + .5) / 5
    out = PreferenceLoss({"kto": 1.0}, {"beta": beta})(LossInputs(policy, ref_kl, label))
    assert float(unpaired_metrics(out, policy, label)["kto/kl"].mean()) == pytest.approx(0.5)
    # a class absent from a window gives no value rather than a zero
    assert "rewards/undesirable" not in unpaired_derived({"sum/rewards/undesirable": 0.0,
                                                          "count/undesirable": 0.0})


def test_dpo_grad_weight_only_for_dpo():
    policy, ref = logps([-1.0, -2.0], [-2.0, -1.0]), logps([-1.5, -1.5], [-1.5, -1.5])
    pref = torch.ones(2)
    for loss, has in (("sigmoid", True), ("ipo", False), ("hinge", False)):
        out = PreferenceLoss({loss: 1.0}, {"beta": 0.1})(LossInputs(policy, ref, pref))
        assert ("dpo/grad_weight" in preference_metrics(out, policy, first_loss=loss)) is has


def write_chat_unpaired(path, n=24, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good = i % 2 == 0
            lo, hi = (0, 20) if good else (30, 58)
            f.write(json.dumps({"prompt": [{"role": "user", "content": words(rng, 3)}],
                                "completion": [{"role": "assistant", "content": words(rng, 3, lo, hi)}],
                                "label": good}) + "\n")
    return path


def test_kto_logs_per_class_metrics_and_reads_conversational_rows(tmp_path):
    data = write_chat_unpaired(tmp_path / "chat_kto.jsonl")
    run = train_dpo(base_config(tmp_path, loss="kto", train_file=str(data), eval_file=str(data), max_steps=6,
                                logging_steps=3, chat_template=CHAT_TEMPLATE))
    row, held = run.train.history[-1], run.train.eval_history[-1]
    for key in ("rewards/desirable", "rewards/undesirable", "logps/desirable", "logps/undesirable", "kto/kl"):
        assert key in row and f"eval/{key}" in held
    assert not {"dpo/grad_weight", "rewards/chosen", "logps/rejected", "rewards/accuracies"} & set(row)
    assert run.data.train.pairs[0].prompt_ids[-1] == tiny_tokenizer().convert_tokens_to_ids("<assistant>")


def test_score_reproduces_training_with_the_saved_budgets_and_takes_messages(tmp_path):
    from preftune.methods.reward import train_reward
    from preftune.rewards.reward_model import saved_settings, score

    rng = random.Random(1)
    rows = [{"prompt": words(rng, 6), "chosen": " " + words(rng, 8, 0, 20),
             "rejected": " " + words(rng, 8, 30, 58)} for _ in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # budgets that cut both prompts and completions: score's own defaults (1024 / 512) would not
    cfg = base_config(tmp_path, output_dir=str(tmp_path / "rm"), max_steps=10,
                      eval_file=str(tmp_path / "train.jsonl"), max_length=9, max_prompt_length=4,
                      chat_template=CHAT_TEMPLATE)
    result = train_reward(cfg)
    held = result.eval_history[-1]
    assert saved_settings(result.final_dir)["max_length"] == 9
    model = str(result.final_dir)
    chosen = score(model, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = score(model, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(held["eval/rewards/accuracies"])
    # the same fp32 scores by other batches and summed in another order: ~1e-7 relative; 1e-4 of it
    assert sum(margins) / len(margins) == pytest.approx(held["eval/rewards/margins"], rel=1e-4)
    wide = score(model, [r["prompt"] for r in rows], [r["chosen"] for r in rows], max_length=1024,
                 max_prompt_length=512)
    assert wide != pytest.approx(chosen)  # the saved budgets were what made the match
    # messages are rendered with the saved chat template, as training renders conversational rows
    messages = score(model, [[{"role": "user", "content": "w1 w2"}]],
                     [[{"role": "assistant", "content": "w3 w4"}]])
    rendered = score(model, ["<user> w1 w2 <assistant> "], ["w3 w4 "])
    assert messages == pytest.approx(rendered)


EOS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_no_eos_twice_with_a_template_that_ends_turns_with_eos():
    tok = tiny_tokenizer()
    tok.chat_template = EOS_TEMPLATE
    eos = tok.eos_token_id
    pt = PairTokenizer(tok, Budgets(64, 32))
    prompt = tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False,
                                     add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": "w1"},
                                    {"role": "assistant", "content": "w2 w3"}], tokenize=False)
    completion = full[len(prompt):]
    assert completion.endswith("</s>\n")  # the template's own EOS, then a newline
    pair = pt.tokenize([PreferencePair(prompt, completion, "w4 w5")]).pairs[0]
    assert pair.chosen_ids.count(eos) == 1 and pair.chosen_ids[-1] == eos
    assert pair.rejected_ids.count(eos) == 1 and pair.rejected_ids[-1] == eos  # plain text still gets its EOS
    unpaired = pt.tokenize_unpaired([UnpairedExample(prompt, completion, True),
                                     UnpairedExample(prompt, "w6", False)])
    assert all(p.chosen_ids.count(eos) == 1 for p in unpaired.pairs)
    sft = pt.tokenize_sft([SFTExample(prompt, ((completion, True),))]).pairs[0]
    assert sft.chosen_ids.count(eos) == 1 and sft.chosen_ids[-1] == eos
    assert sft.chosen_mask is None or len(sft.chosen_mask) == len(sft.chosen_ids)


def test_long_inputs_do_not_warn_about_the_tokenizer_maximum():
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # transformers' logger does not propagate
    hf = logging.getLogger("transformers")
    hf.addHandler(handler)
    try:
        tok = tiny_tokenizer()
        tok.model_max_length = 8
        long = " ".join(["w1"] * 20)
        pair = PairTokenizer(tok, Budgets(16, 8)).tokenize([PreferencePair(long, " w2 w3", " w4")]).pairs[0]
        assert len(pair.prompt_ids) == 8  # cut by the budget, as the warning would have asked
        assert not any("Token indices sequence length" in m for m in seen)
        tok(long)  # the same tokenizer called plainly does warn: the check can fail
        assert any("Token indices sequence length" in m for m in seen)
    finally:
        hf.removeHandler(handler)
