"""What a researcher composes in a script: ``from locallearn import ...`` (docs/api.md).

The model: :class:`GPTConfig` -> :class:`GPT`, cut by a :class:`ChunkPlan` into a :class:`ChunkedGPT` whose chunks
end in heads (:class:`LinearHead`, :class:`MLPHead`, :class:`BlockHead`). The updates: :func:`sequential_backward`
(each chunk's forward and backward in turn, one graph alive: the memory saving) or :func:`joint_backward` (one
backward of the summed local losses), the same gradients either way; :class:`Sequential`, :class:`Joint` and
:class:`PipelineStrategy` are the execution modes a run picks with ``mode=``. A whole run: :func:`compose` the
config as ``python run.py <overrides>`` would, then :func:`train` it.
"""

import time
from pathlib import Path

from omegaconf import DictConfig

from locallearn.config import compose_run_config
from locallearn.model.chunked import ChunkedGPT
from locallearn.model.gpt import GPT, GPTConfig
from locallearn.model.heads import BlockHead, LinearHead, MLPHead
from locallearn.model.plan import ChunkPlan
from locallearn.pipeline.strategy import PipelineStrategy
from locallearn.rundir import claim_fresh
from locallearn.runner import train
from locallearn.training.strategies import Joint, Sequential
from locallearn.training.update import joint_backward, sequential_backward

__all__ = ["GPTConfig", "GPT", "ChunkPlan", "ChunkedGPT", "LinearHead", "MLPHead", "BlockHead", "sequential_backward",
           "joint_backward", "Sequential", "Joint", "PipelineStrategy", "compose", "train"]


def compose(overrides=(), output_dir: str | Path | None = None) -> DictConfig:
    """The run config of ``python run.py <overrides>``, checked by :func:`train` before anything is built. Its
    outputs go to ``output_dir``, or to a fresh ``<paths.log_dir>/runs/<time>_api`` (``./logs`` unless
    ``LOCALLEARN_LOGS`` or a ``paths.log_dir=`` override says otherwise)."""
    if output_dir is None:
        log_dir = compose_run_config(".", overrides).paths.log_dir
        output_dir = claim_fresh(Path(log_dir) / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S_api"))
    return compose_run_config(Path(output_dir), overrides)
