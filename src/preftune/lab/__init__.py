"""Experiments on the embedded model (the demo, the reward-vs-KL frontier, iterative against offline
DPO, the image-text lab) with their reports, plots and result types.

Layer rule: imports every folder below it (``methods``, ``engine``, ``eval``, ``rewards``, ``model``,
``data``, ...) except ``hardware``; nothing in the package imports ``lab`` but the CLI.
"""
