"""Callbacks that turn a run into the outputs a researcher reads (``conf/callbacks/default.yaml``):

* :class:`RunSummary` (``summary.json``), in :mod:`~locallearn.callbacks.summary`;
* :class:`TensorBoardLayout` (one chart per metric, every chunk on it), in :mod:`~locallearn.callbacks.tensorboard`;
* :class:`Diagnostics` (spikes, divergence, plateaus, overfitting; val-curve fits), in
  :mod:`~locallearn.callbacks.diagnostics`.
"""

from locallearn.callbacks.diagnostics import Diagnostics
from locallearn.callbacks.summary import RunSummary
from locallearn.callbacks.tensorboard import CHARTS, TensorBoardLayout

__all__ = ["CHARTS", "Diagnostics", "RunSummary", "TensorBoardLayout"]
