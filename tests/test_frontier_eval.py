"""The reward-vs-KL frontier's measuring tools: Pareto sets, best-of-N, jsonl, plot and report."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import preftune.eval
from preftune.lab.pareto import (
    FrontierPoint,
    best_of_n_kl,
    best_of_n_rewards,
    pareto_frontier,
    read_points_jsonl,
    write_points_jsonl,
)
from preftune.lab.plots import plot_frontier
from preftune.lab.report import format_frontier_table, write_frontier_report
from preftune.lab.results import PolicyEvaluation
from preftune.stats import mean_stderr


def point(method: str, setting: str, kl: float, reward: float, **kw) -> FrontierPoint:
    defaults = dict(reward_stderr=0.02, kl_stderr=0.1, kl_per_token=kl / 20, win_rate=0.6, train_tokens=1000,
                    sample_tokens=500, wall_time_s=2.0)
    return FrontierPoint(method=method, setting=setting, reward=reward, kl=kl, **{**defaults, **kw})


def settings_of(points: list[FrontierPoint]) -> list[str]:
    return [p.setting for p in points]


def test_pareto_frontier_drops_dominated_points_and_sorts_by_kl():
    pts = [
        point("DPO", "a", kl=1.0, reward=0.5),
        point("DPO", "b", kl=2.0, reward=0.4),  # dominated by a (more KL, less reward)
        point("DPO", "c", kl=2.0, reward=0.8),
        point("DPO", "d", kl=1.0, reward=0.5),  # exact duplicate of a: neither dominates
        point("DPO", "e", kl=3.0, reward=0.8),  # same reward as c, more KL: dominated
        point("DPO", "f", kl=0.5, reward=0.2),
        point("DPO", "g", kl=2.0, reward=0.7),  # same KL as c, less reward: dominated
        point("DPO", "h", kl=float("nan"), reward=9.0),  # not finite: never on the frontier
    ]
    assert settings_of(pareto_frontier(pts)) == ["f", "a", "d", "c"]
    assert settings_of(pareto_frontier(pts[::-1])) == ["f", "d", "a", "c"]  # stable for exact ties
    assert pareto_frontier([]) == []


def test_pareto_frontier_is_per_method():
    pts = [point("DPO", "x", kl=1.0, reward=0.5), point("IPO", "y", kl=0.5, reward=0.9),
           point("DPO", "z", kl=2.0, reward=0.6)]
    with pytest.raises(ValueError, match="several methods"):
        pareto_frontier(pts)
    # the IPO point would dominate both DPO points, but methods are compared only with themselves
    assert settings_of(pareto_frontier(pts, method="DPO")) == ["x", "z"]
    assert settings_of(pareto_frontier(pts, method="IPO")) == ["y"]
    assert pareto_frontier(pts, method="PPO") == []


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == math.log(2) - 0.5
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)
    assert all(best_of_n_kl(n) < best_of_n_kl(n + 1) for n in range(1, 64))
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl(0)


PROXY = [[0.1, 0.9, 0.9, 0.2],  # tie between candidates 1 and 2: the first (1) is picked
         [0.5, 0.1, 0.7, 0.7],
         [0.3, 0.3, 0.3, 0.3]]  # all tied: always candidate 0
TRUE = [[1.0, 2.0, 3.0, 4.0],
        [10.0, 20.0, 30.0, 40.0],
        [5.0, 6.0, 7.0, 8.0]]
EXPECTED = {1: [1.0, 10.0, 5.0], 2: [2.0, 10.0, 5.0], 3: [2.0, 30.0, 5.0], 4: [2.0, 30.0, 5.0]}


@pytest.mark.parametrize("as_type", [np.array, torch.tensor])
def test_best_of_n_rewards_picks_the_first_highest_proxy(as_type):
    got = best_of_n_rewards(as_type(PROXY), as_type(TRUE), [1, 2, 3, 4])
    assert sorted(got) == [1, 2, 3, 4]
    for n, expected in EXPECTED.items():
        assert isinstance(got[n], np.ndarray) and got[n].shape == (3,)
        np.testing.assert_array_equal(got[n], expected)


def test_best_of_n_rewards_rejects_bad_input():
    proxy, true = np.array(PROXY), np.array(TRUE)
    with pytest.raises(ValueError, match="1 <= n <= M = 4"):
        best_of_n_rewards(proxy, true, [2, 5])
    with pytest.raises(ValueError, match="1 <= n <= M = 4"):
        best_of_n_rewards(proxy, true, [0])
    with pytest.raises(ValueError, match="one shape"):
        best_of_n_rewards(proxy, true[:, :3], [1])
    with pytest.raises(ValueError, match="one shape"):
        best_of_n_rewards(proxy[0], true[0], [1])
    proxy[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        best_of_n_rewards(proxy, true, [1])


def test_mean_stderr():
    mean, stderr = mean_stderr([1.0, 2.0, 3.0])
    assert mean == 2.0 and stderr == pytest.approx(1.0 / math.sqrt(3))
    assert mean_stderr([0.25]) == (0.25, 0.0)
    with pytest.raises(ValueError):
        mean_stderr([])


def test_points_jsonl_round_trip(tmp_path):
    pts = [point("DPO", "beta=0.1", kl=1.5, reward=0.3, extra={"loss": 0.41}),
           point("best-of-N", "N=8", kl=best_of_n_kl(8), reward=0.5, win_rate=None, train_tokens=0)]
    path = write_points_jsonl(pts, tmp_path / "points.jsonl")
    assert len(path.read_text().splitlines()) == 2
    assert read_points_jsonl(path) == pts


def test_policy_evaluation_json_round_trip():
    r = PolicyEvaluation(0.1, 0.01, 0.5, 0.01, 0.8, 2.0, 0.1, 0.05, 0.7, 0.9, 0.95, 10, 4, 8, 1.0,
                         {"train": 0.5}, "out", {"report": "out/report.md"})
    assert PolicyEvaluation.from_json(r.to_json()) == r


def test_eval_imports_nothing_from_lab():
    """Layering: eval/ sits below lab/ and must not import it."""
    for file in Path(preftune.eval.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("preftune.lab") for n in names), f"{file.name} imports {names}"


FRONTIER = [
    point("IPO", "tau=0.5", kl=1.0, reward=0.30, wall_time_s=3.0, train_tokens=2000),
    point("DPO", "beta=0.5", kl=0.8, reward=0.20),
    point("DPO", "beta=0.1", kl=2.5, reward=0.45, wall_time_s=4.5),
    point("DPO", "beta=0.3", kl=1.9, reward=0.15),  # dominated by beta=0.5
    point("best-of-N", "N=4", kl=best_of_n_kl(4), reward=0.25, win_rate=None, train_tokens=0,
          wall_time_s=0.5),
]


def test_plot_frontier_writes_a_png(tmp_path):
    path = plot_frontier(FRONTIER, tmp_path / "frontier.png", title="test")
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 1000


def test_frontier_report_has_a_row_per_run_and_a_compute_summary(tmp_path):
    path = write_frontier_report(FRONTIER, tmp_path / "report.md", title="Frontier", intro="An intro.",
                                 settings={"prompts": 64}, command="preftune frontier", notes=["a note"])
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Frontier\n\nAn intro.")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "±" in line][1:]  # [0]: header
    assert len(rows) == len(FRONTIER)
    # grouped by method in order of appearance, then by KL; the dominated DPO run is not marked
    assert [r.split(" | ")[1] for r in rows] == ["tau=0.5", "beta=0.5", "beta=0.3", "beta=0.1", "N=4"]
    assert [r.rstrip(" |").endswith("*") for r in rows] == [True, True, False, True, True]
    assert "| 0.8 ± 0.100 |" not in text and "| 0.800 ± 0.100 |" in rows[1]
    assert "| – |" in rows[-1]  # best-of-N has no win rate
    assert "| DPO | 3 | 8.5 | 3,000 | 1,500 |" in text
    assert "| IPO | 1 | 3.0 | 2,000 | 500 |" in text
    assert "| best-of-N | 1 | 0.5 | 0 | 500 |" in text
    assert "| prompts | 64 |" in text and "`preftune frontier`" in text
    assert "![reward vs KL frontier](frontier.png)" in text and "- a note" in text


def test_format_frontier_table():
    table = format_frontier_table(FRONTIER)
    body = [line for line in table.splitlines() if "±" in line][1:]  # [0]: header
    assert len(body) == len(FRONTIER)
    assert body[0].startswith("IPO") and "beta=0.3" in body[2] and not body[2].endswith("*")
