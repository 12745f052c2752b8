"""Bradley-Terry strengths from pairwise wins, with Wald confidence intervals.

Model: player i has strength a_i > 0 and P(i beats j) = a_i / (a_i + a_j) = expit(t_i - t_j), t = log a.
With w_ij the number of wins of i over j, n_ij = w_ij + w_ji and W_i = sum_j w_ij, the log-likelihood is
    l(t) = sum_ij w_ij [t_i - log(e^t_i + e^t_j)].
It is fitted by the MM algorithm of Hunter (2004, Ann. Statist. 32:384), which increases l every step:
    a_i <- W_i / sum_{j != i} n_ij / (a_i + a_j),
renormalised each step to geometric mean 1 (sum t_i = 0), since l is invariant to scaling all a_i.

The MLE exists (and is unique) iff the "i beat j" graph is strongly connected (Hunter 2004, Assumption 1):
for every split of the players into two groups, someone in each group beat someone in the other. A player
that never wins (or never loses) violates it: its MLE strength is 0 (or infinite), and fitting raises a
ValueError naming it. ``prior=c > 0`` instead adds c pseudo-wins to every ordered pair i != j (c virtual
games each way between every two players), a symmetric shrinkage toward equal strengths under which the
MLE always exists; intervals then describe the augmented counts.

Intervals: the observed Fisher information of t is the weighted graph Laplacian
    I_ii = sum_j n_ij p_ij p_ji,   I_ij = -n_ij p_ij p_ji,   p_ij = a_i / (a_i + a_j),
singular along (1, ..., 1). Under the constraint sum t_i = 0 the covariance is its Moore-Penrose inverse
C = pinv(I). Wald intervals for a contrast t_i - t_j use Var = C_ii + C_jj - 2 C_ij; since
logit P(i beats j) = t_i - t_j, the delta method on the logit scale gives the interval
    expit((t_i - t_j) +- z * sqrt(Var)),  z = Phi^-1((1 + level) / 2).
"""

from __future__ import annotations

import csv
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from preftune.cli_args import OneLineParser

__all__ = ["BTResult", "WinTable", "fit_bradley_terry", "format_table", "load_wins_csv", "main"]


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1.0 + level) / 2.0)


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True, eq=False)
class WinTable:
    """Named players and ``wins[i, j]`` = number of times player i beat player j."""

    names: tuple[str, ...]
    wins: np.ndarray

    @classmethod
    def from_csv(cls, path: str | Path) -> WinTable:
        """Read a CSV with header ``winner,loser[,count]`` (count defaults to 1; repeated rows add up).

        Players are numbered in order of first appearance. A bad row raises a one-line ValueError
        naming the file, the row (line) number and the field.
        """
        path = Path(path)
        index: dict[str, int] = {}
        games: list[tuple[int, int, float]] = []
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [k for k in ("winner", "loser") if k not in header]
            if missing or not set(header) <= {"winner", "loser", "count"}:
                raise ValueError(f"{path}, row 1: header must be 'winner,loser[,count]', "
                                 f"got {','.join(header)!r}")
            reader.fieldnames = header
            for row in reader:
                where = f"{path}, row {reader.line_num}"
                if None in row:
                    raise ValueError(f"{where}: too many fields")
                for key in ("winner", "loser"):
                    if not (row.get(key) or "").strip():
                        raise ValueError(f"{where}, field '{key}': empty")
                winner, loser = row["winner"].strip(), row["loser"].strip()
                if winner == loser:
                    raise ValueError(f"{where}, field 'loser': same as winner {winner!r}")
                raw = (row.get("count") or "").strip()
                try:
                    count = float(raw) if raw else 1.0
                except ValueError:
                    count = -1.0
                if not (math.isfinite(count) and count >= 0):
                    raise ValueError(f"{where}, field 'count': expected a non-negative number, got {raw!r}")
                games.append((index.setdefault(winner, len(index)), index.setdefault(loser, len(index)),
                              count))
        if not games:
            raise ValueError(f"{path}: no games")
        wins = np.zeros((len(index), len(index)))
        for i, j, c in games:
            wins[i, j] += c
        return cls(tuple(index), wins)


def load_wins_csv(path: str | Path) -> WinTable:
    """Alias of :meth:`WinTable.from_csv`."""
    return WinTable.from_csv(path)


@dataclass(frozen=True, eq=False)
class BTResult:
    """Fitted model. ``strengths`` a_i have geometric mean 1; ``log_strengths`` t_i sum to 0;
    ``covariance`` is the sum-to-zero covariance of t; ``wins`` the (prior-augmented) counts fitted."""

    names: tuple[str, ...]
    strengths: np.ndarray
    log_strengths: np.ndarray
    covariance: np.ndarray
    wins: np.ndarray
    n_iter: int

    def _idx(self, i: int | str) -> int:
        return self.names.index(i) if isinstance(i, str) else int(i)

    def prob(self, i: int | str, j: int | str) -> float:
        """P(i beats j) = a_i / (a_i + a_j); players by index or name."""
        i, j = self._idx(i), self._idx(j)
        return _expit(self.log_strengths[i] - self.log_strengths[j])

    def log_ratio_se(self, i: int | str, j: int | str) -> float:
        """Standard error of t_i - t_j: sqrt(C_ii + C_jj - 2 C_ij)."""
        i, j, c = self._idx(i), self._idx(j), self.covariance
        return math.sqrt(max(c[i, i] + c[j, j] - 2.0 * c[i, j], 0.0))

    def prob_interval(self, i: int | str, j: int | str, level: float = 0.95) -> tuple[float, float]:
        """Wald interval for P(i beats j) on the logit scale: expit(t_i - t_j +- z * se)."""
        d = self.log_strengths[self._idx(i)] - self.log_strengths[self._idx(j)]
        h = _z(level) * self.log_ratio_se(i, j)
        return _expit(d - h), _expit(d + h)

    def ratio_interval(self, i: int | str, j: int | str, level: float = 0.95) -> tuple[float, float]:
        """Wald interval for a_i / a_j: exp(t_i - t_j +- z * se)."""
        d = self.log_strengths[self._idx(i)] - self.log_strengths[self._idx(j)]
        h = _z(level) * self.log_ratio_se(i, j)
        return math.exp(d - h), math.exp(d + h)

    def ranking(self) -> list[str]:
        """Names from strongest to weakest (ties keep input order)."""
        return [self.names[k] for k in np.argsort(-self.log_strengths, kind="stable")]


def _reach(adj: np.ndarray) -> bool:
    seen, stack = {0}, [0]
    while stack:
        for k in np.flatnonzero(adj[stack.pop()]):
            if int(k) not in seen:
                seen.add(int(k))
                stack.append(int(k))
    return len(seen) == adj.shape[0]


def fit_bradley_terry(wins: np.ndarray | WinTable, names: Sequence[str] | None = None, *, prior: float = 0.0,
                      tol: float = 1e-10, max_iter: int = 10000) -> BTResult:
    """Maximum-likelihood Bradley-Terry fit by MM; see the module docstring for the method.

    ``wins[i, j]`` = times i beat j (diagonal ignored). ``names`` defaults to the WinTable's or "0", "1", ...
    Iterates until max |change in t| < ``tol`` (warns if ``max_iter`` is reached). Raises ValueError if the
    MLE does not exist (a player never wins / never loses, or the win graph is not strongly connected).
    """
    if isinstance(wins, WinTable):
        names = wins.names if names is None else names
        wins = wins.wins
    w = np.array(wins, dtype=float)
    m = w.shape[0]
    if w.ndim != 2 or w.shape != (m, m) or m < 2:
        raise ValueError(f"wins must be a square matrix of at least 2 players, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("wins must be finite and non-negative")
    names = tuple(str(k) for k in range(m)) if names is None else tuple(names)
    if len(names) != m:
        raise ValueError(f"{len(names)} names for {m} players")
    np.fill_diagonal(w, 0.0)
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    w += prior * (1.0 - np.eye(m))
    won, lost = w.sum(1), w.sum(0)
    for total, what in ((won, "never wins (MLE strength 0)"), (lost, "never loses (MLE strength infinite)")):
        if (total == 0).any():
            raise ValueError(f"player {names[int(np.argmin(total))]!r} {what}: the Bradley-Terry MLE "
                             "does not exist; add games, drop the player, or pass prior > 0")
    if not (_reach(w > 0) and _reach(w.T > 0)):
        raise ValueError("the Bradley-Terry MLE does not exist: some group of players never beat the rest "
                         "(win graph not strongly connected); add games or pass prior > 0")
    n = w + w.T
    t, n_iter, step = np.zeros(m), 0, math.inf
    while step >= tol and n_iter < max_iter:
        a = np.exp(t)
        new = np.log(won / (n / (a[:, None] + a[None, :])).sum(1))
        new -= new.mean()
        step, t, n_iter = np.abs(new - t).max(), new, n_iter + 1
    if step >= tol:
        warnings.warn(f"Bradley-Terry MM did not converge in {max_iter} iterations", RuntimeWarning,
                      stacklevel=2)
    p = 1.0 / (1.0 + np.exp(t[None, :] - t[:, None]))  # p[i, j] = P(i beats j)
    info = -n * p * p.T
    np.fill_diagonal(info, 0.0)
    np.fill_diagonal(info, -info.sum(1))
    cov = np.linalg.pinv(info, hermitian=True)
    return BTResult(names, np.exp(t), t, cov, w, n_iter)


def format_table(result: BTResult, level: float = 0.95) -> str:
    """Ranked table: strength relative to the top player (= 1), its Wald CI, wins and losses."""
    top = result.ranking()[0]
    pct = f"{100 * level:g}% CI"
    rows = [("rank", "name", "strength", pct, "wins", "losses")]
    for r, name in enumerate(result.ranking(), 1):
        k = result.names.index(name)
        rel = result.strengths[k] / result.strengths[result.names.index(top)]
        ci = ("(reference)" if name == top
              else "[{:.3g}, {:.3g}]".format(*result.ratio_interval(name, top, level)))
        rows.append((str(r), name, f"{rel:.3g}", ci, f"{result.wins[k].sum():g}",
                     f"{result.wins[:, k].sum():g}"))
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    left = {1, 3}
    lines = ["  ".join(s.ljust(wd) if c in left else s.rjust(wd)
                       for c, (s, wd) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines) + f"\nstrength relative to {top!r}; Wald intervals"


def main(argv: list[str] | None = None) -> int:
    """``preftune bt wins.csv [--level 0.95] [--prior 0]``: fit and print the ranked table."""
    parser = OneLineParser(prog="preftune bt", description="Fit Bradley-Terry strengths from a CSV "
                           "of pairwise wins (header winner,loser[,count]) and print a ranked table.")
    parser.add_argument("csv", help="CSV with header winner,loser[,count]")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    parser.add_argument("--prior", type=float, default=0.0,
                        help="pseudo-wins added to every ordered pair (default 0: plain MLE)")
    args = parser.parse_args(argv)
    try:
        _z(args.level)
        result = fit_bradley_terry(WinTable.from_csv(args.csv), prior=args.prior)
    except (ValueError, FileNotFoundError) as e:
        print(f"preftune bt: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result, args.level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
