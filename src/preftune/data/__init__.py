"""Data: files -> rows -> text pairs -> token pairs (Arrow, cached) -> forward batches.

Layer rule: imports no other preftune folder (only the leaves ``cli_args``, ``quiet``, ``stats``).
A new file format goes in ``io.py``, a new row layout in ``rows.py`` / ``formats.py``.
"""
