import math

import numpy as np
import pytest

from preftune.eval.bradley_terry import WinTable, fit_bradley_terry, format_table, main


def _acceptance_wins() -> np.ndarray:
    w = np.zeros((3, 3))  # A, B, C
    w[0, 1], w[1, 0] = 8, 4  # A beat B 8 times, B beat A 4 times
    w[0, 2], w[2, 0] = 3, 5  # A beat C 3 times, C beat A 5 times
    return w


def test_acceptance_exact_values():
    res = fit_bradley_terry(_acceptance_wins(), ["A", "B", "C"])
    a = dict(zip(res.names, res.strengths))
    assert a["B"] == pytest.approx(a["A"] / 2, abs=1e-6)
    assert a["C"] == pytest.approx(5 * a["A"] / 3, abs=1e-6)
    assert res.prob("B", "C") == pytest.approx(3 / 13, abs=1e-6)
    assert res.prob(1, 2) + res.prob(2, 1) == pytest.approx(1.0)
    assert np.prod(res.strengths) == pytest.approx(1.0) and abs(res.log_strengths.sum()) < 1e-12
    assert res.ranking() == ["C", "A", "B"]
    lo, hi = res.prob_interval("B", "C")
    assert lo < 3 / 13 < hi


def test_two_player_variance_is_inverse_fisher():
    res = fit_bradley_terry(np.array([[0, 8], [4, 0]]), ["A", "B"])
    # Var(t_A - t_B) = 1 / (n p q) with n = 12, p = 2/3
    assert res.log_ratio_se(0, 1) ** 2 == pytest.approx(1 / (12 * 2 / 3 * 1 / 3))
    assert np.allclose(res.covariance.sum(0), 0.0)
    z = 1.959963984540054
    d, se = math.log(2), res.log_ratio_se(0, 1)
    lo, hi = res.prob_interval("A", "B")
    assert lo == pytest.approx(1 / (1 + math.exp(-(d - z * se))))
    assert hi == pytest.approx(1 / (1 + math.exp(-(d + z * se))))


def test_recovers_known_strengths_within_ci():
    rng = np.random.default_rng(0)
    true_t = np.array([1.2, 0.5, 0.0, -0.3, -1.0, -1.6])
    m = len(true_t)
    w = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            k = rng.binomial(2000, 1 / (1 + math.exp(true_t[j] - true_t[i])))
            w[i, j], w[j, i] = k, 2000 - k
    res = fit_bradley_terry(w)
    true_c = true_t - true_t.mean()
    assert np.abs(res.log_strengths - true_c).max() < 0.1
    covered = 0
    for i in range(m):
        for j in range(m):
            if i != j:
                p = 1 / (1 + math.exp(true_t[j] - true_t[i]))
                lo, hi = res.prob_interval(i, j, level=0.999)
                assert lo < p < hi
                lo, hi = res.prob_interval(i, j)
                covered += lo < p < hi
    assert covered >= 0.8 * m * (m - 1)
    assert res.ranking() == [str(k) for k in range(m)]


def test_never_wins_and_never_loses_raise():
    w = _acceptance_wins()
    w[1, 0] = 0  # B never wins
    with pytest.raises(ValueError, match=r"player 'B' never wins"):
        fit_bradley_terry(w, ["A", "B", "C"])
    w = _acceptance_wins()
    w[0, 2] = 0
    w[0, 1] = 0
    w[2, 0] = w[1, 0] = 0
    w[2, 1] = 1  # C beats B only, A plays nobody
    with pytest.raises(ValueError, match=r"player 'A' never wins"):
        fit_bradley_terry(w, ["A", "B", "C"])
    w = _acceptance_wins()
    w[1, 0] = w[2, 0] = 0  # A never loses; B and C still win and lose against each other
    w[1, 2] = w[2, 1] = 1
    with pytest.raises(ValueError, match=r"player 'A' never loses"):
        fit_bradley_terry(w, ["A", "B", "C"])


def test_not_strongly_connected_raises_and_prior_fixes():
    # {A, B} always beat {C, D}, though everyone wins and loses some game
    w = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0]], float)
    with pytest.raises(ValueError, match="strongly connected"):
        fit_bradley_terry(w)
    w = _acceptance_wins()
    w[1, 0] = 0
    res = fit_bradley_terry(w, ["A", "B", "C"], prior=0.5)
    assert res.ranking()[-1] == "B" and np.isfinite(res.covariance).all()


def test_csv_loader(tmp_path):
    f = tmp_path / "wins.csv"
    f.write_text("winner,loser,count\nA,B,5\nB,A,4\nA,B,3\nA,C,3\nC,A,\n C ,A,5\n")
    table = WinTable.from_csv(f)
    assert table.names == ("A", "B", "C")
    assert table.wins.tolist() == [[0, 8, 3], [4, 0, 0], [6, 0, 0]]
    g = tmp_path / "nocount.csv"
    g.write_text("loser,winner\nB,A\nB,A\nA,B\n")
    t2 = WinTable.from_csv(g)
    assert t2.names == ("A", "B") and t2.wins.tolist() == [[0, 2], [1, 0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("winner,loser\nA,B\nA,\n", r"bad\.csv, row 3, field 'loser': empty"),
        ("winner,loser,count\nA,B,2\nB,A,x\n",
         r"bad\.csv, row 3, field 'count': expected a non-negative number, got 'x'"),
        ("winner,loser,count\nA,B,-1\n", r"bad\.csv, row 2, field 'count'"),
        ("winner,loser\nA,A\n", r"bad\.csv, row 2, field 'loser': same as winner 'A'"),
        ("winner,loser\nA,B,7\n", r"bad\.csv, row 2: too many fields"),
        ("win,lose\nA,B\n", r"bad\.csv, row 1: header"),
        ("winner,loser\n", r"bad\.csv: no games"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        WinTable.from_csv(f)
    assert "\n" not in str(err.value)


def test_cli_table(tmp_path, capsys):
    f = tmp_path / "wins.csv"
    f.write_text("winner,loser,count\nA,B,8\nB,A,4\nA,C,3\nC,A,5\n")
    assert main([str(f)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["rank", "name", "strength", "95%", "CI"]
    assert lines[2].split()[:4] == ["1", "C", "1", "(reference)"]
    assert lines[3].split()[:3] == ["2", "A", "0.6"] and lines[3].split()[-2:] == ["11", "9"]
    assert lines[4].split()[:3] == ["3", "B", "0.3"] and lines[4].split()[-2:] == ["4", "8"]
    assert out == format_table(fit_bradley_terry(WinTable.from_csv(f))) + "\n"
    assert main([str(f), "--level", "0.9"]) == 0
    assert "90% CI" in capsys.readouterr().out


def test_cli_error(tmp_path, capsys):
    f = tmp_path / "wins.csv"
    f.write_text("winner,loser\nA,B\n")
    assert main([str(f)]) == 2
    assert "never wins" in capsys.readouterr().err
