"""Build a run's objects from its composed config: what the training entry, the pipeline workers and probing share."""

import logging
import warnings

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from locallearn.chunked import ChunkedGPT
from locallearn.chunking import ChunkPlan
from locallearn.errors import ConfigError
from locallearn.execution import Sequential, Strategy
from locallearn.model import GPT
from locallearn.module import LocalLearner
from locallearn.switch import Switch


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate``, letting our one-sentence :class:`ConfigError` through unwrapped."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


# Keys of the optim group that locallearn reads itself; the rest go to the optimizer.
OPTIM_KEYS = ("chunk_lr", "hypergrad_lr")


def optimizer_factory(optim: DictConfig):
    """The ``_partial_`` optimizer of ``optim``, without locallearn's own keys."""
    node = OmegaConf.masked_copy(optim, [k for k in optim if k not in OPTIM_KEYS])
    return instantiate(node)


def make_net(cfg: DictConfig, objective, vocab_size: int) -> ChunkedGPT:
    """The chunked model ``cfg`` describes, for data of ``vocab_size`` tokens (``objective`` is bound to it)."""
    objective.bind(vocab_size)
    model_cfg = instantiate(cfg.model, vocab_size=vocab_size + objective.extra_tokens)
    plan = ChunkPlan.build(model_cfg.n_layer, cfg.chunks, cfg.chunking.get("boundaries"), cfg.get("overlap", 0))
    net = ChunkedGPT(GPT(model_cfg), plan, instantiate(cfg.head), objective.chunk_module)
    if cfg.get("compile"):  # the blocks only: the cut, the heads and the losses stay eager, in every mode
        for block in net.gpt.blocks:
            block.compile()
    return net


def make_module(cfg: DictConfig, net: ChunkedGPT, objective) -> LocalLearner:
    """The LightningModule that trains ``net`` as ``cfg`` says."""
    return LocalLearner(
        net, objective,
        strategy=make_strategy(cfg, len(net)),
        optimizer=optimizer_factory(cfg.optim),
        scheduler=instantiate(cfg.schedule) if cfg.get("schedule") is not None else None,
        grad_clip=cfg.grad_clip,
        loss_weights=cfg.get("loss_weights"),
        switch=Switch(**cfg.get("switch", {})),
        seed=cfg.seed,
        config=OmegaConf.to_container(cfg, resolve=True),
        chunk_lr=cfg.optim.get("chunk_lr"),
        hypergrad_lr=cfg.optim.get("hypergrad_lr"),
    )


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
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())
