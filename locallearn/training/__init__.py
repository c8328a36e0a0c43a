"""Training: the LightningModule (:mod:`.learner`), the one chunk update (:mod:`.update`), the execution
strategies over it (:mod:`.strategies`; the pipeline's is :mod:`locallearn.pipeline`), LR schedules, the
local-to-global switch, hypergradient LR, per-chunk metrics, activation memory, checkpoints, DDP, callbacks,
and the LR range test. Builds on :mod:`locallearn.model`, :mod:`locallearn.data` and the analysis library's
detectors; never on the entry points above it.
"""
