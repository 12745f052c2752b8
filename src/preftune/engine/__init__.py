"""The method-agnostic trainer: the loop (``loop.py``) over step sources (``steps.py``), faults and
atomic checkpoints, optimizer and schedule, metrics, progress, diagnostics, the config and its
``--help``, TRL's key names, the accelerate side (``accelerator.py``), how the module is spread over
processes (``sharding.py``: DDP or FSDP2) and the run set-up shared by the methods (``setup.py``:
model, tokenizer, data; the ``hardware`` choices applied there).

Layer rule: imports ``rewards``, ``model``, ``losses``, ``data``, ``hardware`` and the leaves; never
a method. A new method does not change this folder.
"""
