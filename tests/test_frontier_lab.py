"""``preftune lab frontier`` on a tiny setting: a point per run, the plot, the table, deterministic."""

from __future__ import annotations

import json

import pytest

from preftune.lab.frontier import QUICK, FrontierOptions, main, resolve_options, run_frontier
from preftune.lab.pareto import read_points_jsonl
from preftune.model.hub import EMBEDDED_MODEL

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                 reason="embedded model missing")]

TINY = dict(num_prompts=32, eval_prompts=4, eval_samples=2, max_new_tokens=8, dpo_betas="0.1,1.0",
            ipo_taus="0.5", ppo_kl_coefs="0.1", ppo_rounds=2, rollout_batch_size=16, best_of_n="2,4",
            epochs=1.0, rm_epochs=1.0)




def test_frontier_writes_a_point_per_run_the_plot_and_the_table(tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--output_dir={tmp_path / 'a'}"]
    assert main(args) == 0
    points = read_points_jsonl(tmp_path / "a" / "frontier.jsonl")
    methods = [p.method for p in points]
    assert methods == ["pi_ref", "DPO", "DPO", "IPO", "preferred-FT", "PPO (oracle reward)",
                       "PPO (reward model)", "best-of-N", "best-of-N"]
    assert [p.setting for p in points if p.method == "best-of-N"] == ["N=2", "N=4"]
    # sample KL estimates may dip just below 0
    assert points[0].kl == 0.0 and all(p.kl >= -1.0 for p in points)
    trained = [p for p in points if p.method not in ("pi_ref", "best-of-N")]
    assert all(p.train_tokens > 0 and p.wall_time_s > 0 for p in trained)
    assert all(p.sample_tokens > 0 for p in points if p.method.startswith("PPO") or p.method == "best-of-N")
    assert (tmp_path / "a" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "a" / "report.md").read_text()
    # 2 runs + summary
    assert report.count("| DPO |") == 3 and "Compute per method" in report and "frontier.png" in report
    assert "labelled pairs" in report and "reward model r_phi" in report
    out = capsys.readouterr().out
    assert "best-of-N" in out and "report:" in out

    # the same seed gives the same points (wall times aside)
    run_frontier(FrontierOptions(output_dir=str(tmp_path / "b"), **TINY))
    again = read_points_jsonl(tmp_path / "b" / "frontier.jsonl")
    strip = lambda ps: [json.dumps({**p.to_dict(), "wall_time_s": 0}, sort_keys=True) for p in ps]  # noqa: E731
    assert strip(points) == strip(again)


def test_quick_fills_only_the_values_left_at_their_defaults():
    options = resolve_options(FrontierOptions(quick=True, num_prompts=100))
    assert options.num_prompts == 100 and options.eval_prompts == QUICK["eval_prompts"]
    assert resolve_options(FrontierOptions()) == FrontierOptions()


def test_bad_number_list_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="comma-separated numbers"):
        run_frontier(FrontierOptions(output_dir=str(tmp_path), **{**TINY, "dpo_betas": "0.1,big"}))
