"""The preference-data doctor: see what the data will teach before training on it.

* :mod:`~preftune.doctor.checkup`: ``preftune inspect`` (text, token, contamination and flip checks,
  ``--write-clean``); :mod:`~preftune.doctor.report` writes report.md, inspect.json and plots;
* :mod:`~preftune.doctor.annotators`: ``preftune aggregate`` (Dawid-Skene soft labels);
* :mod:`~preftune.doctor.selection`: ``preftune select`` (what to label next).

Importing this package is cheap; torch and transformers load only when a tokenizer or model is used.

Layer rule: imports ``engine`` (the training config and budgets it measures against), ``rewards``,
``model``, ``data`` and the leaves.
"""

from __future__ import annotations

__all__ = ["InspectOptions", "Inspection", "inspect_data", "write_clean", "write_report"]


def __getattr__(name: str):
    if name in ("InspectOptions", "Inspection", "inspect_data", "write_clean"):
        from preftune.doctor import checkup

        return getattr(checkup, name)
    if name == "write_report":
        from preftune.doctor.report import write_report

        return write_report
    raise AttributeError(f"module 'preftune.doctor' has no attribute {name!r}")
