"""What scores a completion: reward models (``reward_model.py``), judges a run names by a string
(``judges.py``: sentiment, a reward-model directory, ``module:function``, pairwise judges) and the
simulated annotator of the labs (``annotator.py``).

Layer rule: imports ``model``, ``losses``, ``data`` and the leaves. A new judge goes in ``judges.py``.
"""
