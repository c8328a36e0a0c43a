"""The analysis library: reading runs and sweeps (:mod:`.sweeps`), the comparison report and its plots, the
depth benefit kept, curve fits, loss-curve detectors and diagnosis, loss plots. Plain Python over files and
numbers: it imports nothing from training, so the training callbacks can use its detectors online.
The scripts in the repository's ``analysis/`` folder are its command-line front ends.
"""
