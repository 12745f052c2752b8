"""Models: loading (text and image-text, ``hub.py`` checks a directory before it loads), log-probs
of a batch in one forward, reference strategies, attention, activation checkpointing, generation.

Layer rule: imports ``data`` and ``losses`` (for the typed values between them) and the leaves.
A faster kernel for one kind of hardware does not go here: it is a leaf in ``hardware/`` that the
engine applies; a layer may carry its own ``fp32_linear`` (see ``logps.py``).
"""
