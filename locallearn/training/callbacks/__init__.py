"""Callbacks that turn a run into the outputs a researcher reads (``conf/callbacks/default.yaml``):

* :class:`RunSummary` (``summary.json``), in :mod:`~locallearn.training.callbacks.summary`;
* :class:`TensorBoardLayout` (one chart per metric, every chunk on it), in :mod:`.tensorboard`;
* :class:`StepProgressBar` (the training bar in steps, to ``trainer.max_steps``), in :mod:`.progress`;
* :class:`Diagnostics` (spikes, divergence, plateaus, overfitting; val-curve fits), in
  :mod:`~locallearn.training.callbacks.diagnostics`.
"""

from locallearn.training.callbacks.diagnostics import Diagnostics
from locallearn.training.callbacks.progress import StepProgressBar
from locallearn.training.callbacks.summary import RunSummary
from locallearn.training.callbacks.tensorboard import CHARTS, TensorBoardLayout

__all__ = ["CHARTS", "Diagnostics", "RunSummary", "StepProgressBar", "TensorBoardLayout"]
