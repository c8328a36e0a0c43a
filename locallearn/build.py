"""Build a run's training objects from its composed config: what the training entry and the pipeline workers share.

The chunked model itself is built by :func:`locallearn.model.chunked.make_net` (probing needs it without training).
"""

import logging
import warnings

from omegaconf import DictConfig, OmegaConf

from locallearn.config import instantiate
from locallearn.model.chunked import ChunkedGPT
from locallearn.training.learner import LocalLearner
from locallearn.training.strategies import Sequential, Strategy
from locallearn.training.switch import Switch

# Keys of the optim group that locallearn reads itself; the rest go to the optimizer.
OPTIM_KEYS = ("chunk_lr", "hypergrad_lr")


def optimizer_factory(optim: DictConfig):
    """The ``_partial_`` optimizer of ``optim``, without locallearn's own keys."""
    node = OmegaConf.masked_copy(optim, [k for k in optim if k not in OPTIM_KEYS])
    return instantiate(node)


def make_module(cfg: DictConfig, net: ChunkedGPT, objective) -> LocalLearner:
    """The LightningModule ``cfg.learner`` names, training ``net`` with the objects ``cfg``'s groups describe."""
    # As a partial, so that the objects below reach it as they are (Hydra would convert or instantiate them).
    return instantiate(cfg.learner, _partial_=True)(
        net=net, objective=objective,
        strategy=make_strategy(cfg, len(net)),
        optimizer=optimizer_factory(cfg.optim),
        scheduler=instantiate(cfg.schedule) if cfg.get("schedule") is not None else None,
        switch=Switch(**cfg.get("switch", {})),
        run_config=OmegaConf.to_container(cfg, resolve=True),
        method=make_method(cfg),
    )


def make_method(cfg: DictConfig):
    """The method ``cfg.method`` names (None: local), without its ``predictor`` (built into the model by make_net)."""
    node = cfg.get("method")
    return instantiate(OmegaConf.masked_copy(node, [k for k in node if k != "predictor"])) if node else None


def make_strategy(cfg: DictConfig, K: int) -> Strategy:
    """The execution strategy ``mode`` chose (``conf/mode/<mode>.yaml``: its ``strategy`` node)."""
    if cfg.mode == "pipeline" and K == 1:  # one chunk has nothing to pipeline: its updates are sequential's
        return Sequential()
    return instantiate(cfg.strategy)


class _DropAdverts(logging.Filter):
    def filter(self, record):
        return "litlogger" not in record.getMessage()


def quiet_lightning():
    """Silence Lightning messages that say nothing about this run."""
    # Batches are slices of an in-memory tensor: worker processes would only add copying.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    # Under trainer=ddp the val metrics are torchmetrics sums reduced over every rank before they are logged
    # (locallearn/training/chunk_metrics.py): each rank logs the same value, which is what sync_dist would make.
    warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())
