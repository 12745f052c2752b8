"""The method-agnostic trainer: the loop, its step-source and objective protocols, faults and
atomic checkpoints, optimizer and schedule, progress, diagnostics, the config and its ``--help``,
TRL's key names, the accelerate side (``accelerator.py``) and the run set-up shared by the methods
(``setup.py``: model, tokenizer, data, reference; the ``hardware`` choices applied there).

Layer rule: imports ``rewards``, ``model``, ``losses``, ``data``, ``hardware`` and the leaves; never
a method. A new method does not change this folder.
"""
