"""Build everything a run needs from its Hydra config, check it, then fit.

``run.py`` is a thin Hydra entry point over :func:`train`. All checks of user input happen in
:func:`build`, before the first training step; each raises :class:`ConfigError` with one sentence.
"""

import errno
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from locallearn.atomic import write_json, write_text
from locallearn.checkpoint import check_compatible, last_checkpoint
from locallearn.checks import check_config
from locallearn.chunked import ChunkedGPT
from locallearn.chunking import ChunkPlan
from locallearn.errors import ConfigError, OutputError
from locallearn.execution import get_step
from locallearn.model import GPT
from locallearn.module import LocalLearner, check_chunk_lr, check_hypergrad_lr, check_loss_weights
from locallearn.pipeline import PipelineLearner, check_pipeline
from locallearn.rundir import save_hydra_files
from locallearn.switch import Switch

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The pieces of one run, built and checked."""

    datamodule: L.LightningDataModule
    module: LocalLearner
    trainer: L.Trainer
    output_dir: Path


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate``, letting our one-sentence :class:`ConfigError` through unwrapped."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def _check_schedule(cfg: DictConfig):
    # Building the scheduler against a throwaway optimizer checks its settings now rather than at
    # the first training step.
    if cfg.get("schedule") is not None:
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        instantiate(cfg.schedule)(dummy, total_steps=cfg.trainer.max_steps)


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
    return ChunkedGPT(GPT(model_cfg), plan, instantiate(cfg.head), objective.chunk_module)


def make_module(cfg: DictConfig, net: ChunkedGPT, objective, switch: Switch | None = None) -> LocalLearner:
    """The LightningModule that trains ``net`` as ``cfg`` says (a :class:`PipelineLearner` for mode=pipeline)."""
    kwargs = dict(
        mode=cfg.mode,
        optimizer=optimizer_factory(cfg.optim),
        scheduler=instantiate(cfg.schedule) if cfg.get("schedule") is not None else None,
        grad_clip=cfg.grad_clip,
        loss_weights=cfg.get("loss_weights"),
        switch=switch or Switch(**cfg.get("switch", {})),
        seed=cfg.seed,
        config=OmegaConf.to_container(cfg, resolve=True),
        chunk_lr=cfg.optim.get("chunk_lr"),
        hypergrad_lr=cfg.optim.get("hypergrad_lr"),
    )
    if cfg.mode != "pipeline" or len(net) == 1:  # one chunk has nothing to pipeline
        return LocalLearner(net, objective, **kwargs)
    pipeline = cfg.get("pipeline", {})
    return PipelineLearner(net, objective, threads=pipeline.get("threads"), backend=pipeline.get("backend", "gloo"),
                           **kwargs)


def build(cfg: DictConfig) -> Run:
    """Seed, check and instantiate data, model, module and trainer. Nothing is trained yet."""
    check_config(cfg)  # every value in its range (locallearn/checks.py) before anything is read or built
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    get_step(cfg.mode)
    objective = instantiate(cfg.objective)
    model_cfg = instantiate(cfg.model, vocab_size=1)  # checks the shape settings before the data loads
    if model_cfg.causal != objective.causal:
        raise ConfigError(
            f"model.causal={model_cfg.causal} does not match objective={objective.name}, which needs "
            f"{'causal' if objective.causal else 'bidirectional'} attention; drop the model.causal override "
            f"(it follows the objective)."
        )
    chunking = cfg.chunking
    if chunking.get("greedy") and cfg.chunks != model_cfg.n_layer:
        raise ConfigError(f"chunking=greedy trains one chunk per block (chunks=model.n_layer={model_cfg.n_layer}) "
                          f"but chunks={cfg.chunks}; drop the chunks override or use chunking=chunked.")
    plan = ChunkPlan.build(model_cfg.n_layer, cfg.chunks, chunking.get("boundaries"), cfg.overlap)
    check_loss_weights(cfg.get("loss_weights"), len(plan))
    check_chunk_lr(cfg.optim.get("chunk_lr"), len(plan))
    check_hypergrad_lr(cfg.optim.get("hypergrad_lr"))
    switch = Switch(**cfg.get("switch", {}))
    if cfg.data.block_size < objective.min_block_size:
        raise ConfigError(f"objective={objective.name} needs data.block_size >= {objective.min_block_size} but got "
                          f"data.block_size={cfg.data.block_size}; raise it or use objective=mlm.")
    if cfg.data.block_size > model_cfg.block_size:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} exceeds model.block_size={model_cfg.block_size}; "
            f"the model has no position embedding past its block_size, so lower data.block_size."
        )
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass the path of a .ckpt file to resume from.")
    _check_schedule(cfg)

    if cfg.mode == "pipeline":
        check_pipeline(cfg)
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and strategy.startswith("ddp"):
        raise ConfigError(f"trainer.strategy={strategy} wraps the model in DistributedDataParallel, which syncs "
                          f"gradients in every backward pass (mode=sequential runs one per chunk); use trainer=ddp, "
                          f"whose strategy syncs them once per step.")

    datamodule = instantiate(cfg.data)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the weights' init does not depend on the data
    net = make_net(cfg, objective, datamodule.vocab_size)
    module = make_module(cfg, net, objective, switch)
    if cfg.get("ckpt_path"):
        check_compatible(cfg.ckpt_path, module.hparams.config, module.state_dict())
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(datamodule, module, trainer, output_dir)


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


def record_config_error(cfg: DictConfig, error: ConfigError) -> None:
    """A ``summary.json`` (and ``.hydra/``) for a sweep job refused before training, so that sweep reports list
    it as failed. Only into a directory that holds no run yet: a refused continuation leaves its run untouched."""
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / "config.yaml").exists():
        return
    save_hydra_files(cfg, output_dir)
    write_json(output_dir / "summary.json", {"status": f"failed: ConfigError: {error}", "steps": 0})


# A run that cannot write (a full disk, a read-only or vanished directory) ends with one line, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT,
                errno.EIO}


def _is_output(e: OSError, cfg: DictConfig, run: Run) -> bool:
    """Whether ``e`` failed a write of this run's outputs (not, say, a read of some other file)."""
    if e.errno not in WRITE_ERRNOS or not e.filename:
        return False
    path = Path(os.fsdecode(e.filename)).resolve()
    return any(path.is_relative_to(Path(d).resolve()) for d in (run.output_dir, cfg.paths.log_dir))


def _write_failure(e: OSError, cfg: DictConfig, run: Run) -> OutputError:
    ckpt = last_checkpoint(run.trainer)
    kept = (f"{ckpt.last_model_path} (step {ckpt.last_step}) is intact, and resume={run.output_dir} continues from it"
            if ckpt else "no checkpoint had been written yet")
    return OutputError(f"could not write {e.filename or 'an output file'} ({e.strerror or e}) with "
                       f"paths.log_dir={cfg.paths.log_dir}; free space there or point paths.log_dir at a writable "
                       f"disk; {kept}.")


def train(cfg: DictConfig) -> dict:
    """Fit one run; return its summary (also written to ``summary.json`` in the run directory)."""
    quiet_lightning()
    run = build(cfg)
    if rank_zero_only.rank == 0:  # data-parallel processes share rank 0's directory; only it writes
        save_hydra_files(cfg, run.output_dir)
        # .hydra/config.yaml keeps interpolations; this one holds the values the run used.
        write_text(run.output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        run.datamodule.save_vocab(run.output_dir)
    log.info(run.datamodule.describe())
    log.info("chunk plan (%s mode):\n%s", cfg.mode, run.module.net.plan.describe())
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except OSError as e:
        if not _is_output(e, cfg, run):
            raise
        raise _write_failure(e, cfg, run) from e
    finally:
        if hasattr(run.module, "shutdown"):  # mode=pipeline: no worker process outlives its run
            run.module.shutdown()
    summary_cb = next((c for c in run.trainer.callbacks if type(c).__name__ == "RunSummary"), None)
    summary = summary_cb.summary(run.trainer, run.module, "finished") if summary_cb else {}
    if summary.get("val_loss") and run.trainer.global_rank == 0:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in summary["val_loss"].items())
        log.info("final val loss: %s | %d steps in %.0f s, %.0f tokens/s | run dir: %s", losses, summary["steps"],
                 summary["wall_time_s"], summary["tokens_per_s"] or 0, run.output_dir)
        if summary.get("answer_acc"):
            for line in answers_by_depth(summary, [c.end for c in run.module.net.plan]):
                log.info(line)
        command = end_to_end_command()
        if len(run.module.net) > 1 and command:
            log.info("its end-to-end reference (same model, data, steps and seed): %s ; then compare the two: "
                     "python analysis/compare.py %s <its run dir>", command, run.output_dir)
    return summary


def answers_by_depth(summary: dict, ends: list[int]) -> list[str]:
    """The closing lines of a run on a task: answer accuracy per chunk with its depth, and what depth bought."""
    accs, chance = list(summary["answer_acc"].values()), summary["chance"]["answer_acc"]
    lines = ["final answer accuracy: " + ", ".join(f"{k} (depth {d}) {v:.1%}" for (k, v), d in
                                                   zip(summary["answer_acc"].items(), ends))
             + f" (chance {chance:.1%})"]
    if len(accs) > 1:
        lines.append(f"what depth bought in this run: {accs[-1] - accs[0]:+.1%} answer accuracy from chunk 1 "
                     f"({ends[0]} block(s), {accs[0]:.1%}) to the last chunk ({ends[-1]} blocks, {accs[-1]:.1%})")
    return lines


def end_to_end_command() -> str | None:
    """The command line of the running job's end-to-end reference: its overrides without the chunk settings, with
    ``chunks=1`` (None outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    from locallearn.compare import LOCAL_KEYS, under

    if not HydraConfig.initialized():
        return None
    keep = [o for o in HydraConfig.get().overrides.task
            if not under(o.lstrip("+~").split("=", 1)[0], (*LOCAL_KEYS, "resume", "ckpt_path", "hydra"))]
    return "python run.py " + " ".join([*keep, "chunks=1"])
