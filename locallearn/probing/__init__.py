"""Probing: how good are each chunk's features, measured against the same depth of an end-to-end model.

``tasks`` (labelled words), ``features`` (hidden states of a finished run), ``probes`` (classifiers
with control tasks), ``cka`` (representation similarity and its null), ``runs`` (which runs, each
paired with its same-seed end-to-end reference) and ``report`` (CSV, plots, summary); the command
line is ``analysis/probe.py``.
"""
