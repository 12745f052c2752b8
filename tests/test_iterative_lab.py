"""``preftune lab iterate`` on a tiny setting: pi_0, a point per round, the offline point, the report."""

from __future__ import annotations

import pytest

from preftune.lab.iterative import main, reward_at_kl
from preftune.lab.pareto import read_points_jsonl
from preftune.model.hub import EMBEDDED_MODEL

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                 reason="embedded model missing")]


def test_iterative_lab_writes_both_curves(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["--output_dir", str(out), "--rounds", "2", "--prompts_per_round", "16",
                 "--judge_prompts", "32", "--eval_prompts", "6", "--eval_samples", "2",
                 "--max_new_tokens", "8", "--epochs", "1"]) == 0
    points = read_points_jsonl(out / "frontier.jsonl")
    assert [(p.method, p.setting) for p in points] == [("pi_0", "round 0"), ("iterative DPO", "round 1"),
                                                      ("iterative DPO", "round 2"),
                                                      ("offline DPO", "round 1")]
    offline = points[-1]
    assert offline.extra["pairs"] == sum(p.extra["pairs"] for p in points if p.method == "iterative DPO")
    assert all(p.train_tokens > 0 and p.sample_tokens > 0 for p in points[1:])
    report = (out / "report.md").read_text()
    assert "At the offline run's KL" in report and "held-out pair accuracy" in report
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "offline DPO" in capsys.readouterr().out


def test_reward_at_kl_interpolates_along_the_curve():
    from preftune.lab.pareto import FrontierPoint

    def point(kl, reward):
        return FrontierPoint("m", "-", reward, 0.0, kl, 0.0, 0.0, None, 0, 0, 0.0, {})

    curve = [point(0.0, 0.2), point(2.0, 0.6), point(4.0, 0.7)]
    assert reward_at_kl(curve, 1.0) == pytest.approx(0.4)
    assert reward_at_kl(curve, 3.0) == pytest.approx(0.65)
    assert reward_at_kl(curve, 5.0) != reward_at_kl(curve, 5.0)  # outside the curve: nan
