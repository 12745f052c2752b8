"""``preftune eval``: models against a baseline on held-out prompts and preference pairs (win rates
with intervals, length control, position swaps, a Bradley-Terry leaderboard, KL, accuracy).

Layer rule: imports ``rewards``, ``model``, ``losses``, ``data`` and the leaves (not the engine or the
methods: evaluating trains nothing).
"""
