"""Build everything a run needs from its Hydra config, check it, then fit.

``run.py`` is a thin Hydra entry point over :func:`train`. All checks of user input happen in
:func:`build`, before the first training step; each raises :class:`ConfigError` with one sentence.
"""

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from locallearn.atomic import write_json, write_text
from locallearn.build import make_module, quiet_lightning
from locallearn.checks.run import check_run
from locallearn.config import instantiate
from locallearn.errors import ConfigError, OutputError
from locallearn.model.chunked import make_net
from locallearn.process import setup_process
from locallearn.rundir import save_hydra_files
from locallearn.training.checkpoint import check_compatible, last_checkpoint
from locallearn.training.learner import LocalLearner

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The pieces of one run, built and checked."""

    datamodule: L.LightningDataModule
    module: LocalLearner
    trainer: L.Trainer
    output_dir: Path


def build(cfg: DictConfig) -> Run:
    """Seed, check and instantiate data, model, module and trainer. Nothing is trained yet."""
    check_run(cfg)  # every value and every combination (locallearn/checks/) before anything is read or built
    setup_process(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    objective = instantiate(cfg.objective)
    datamodule = instantiate(cfg.data, **saved_tokenizer(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the weights' init does not depend on the data
    net = make_net(cfg, objective, datamodule.vocab_size)
    module = make_module(cfg, net, objective)
    if cfg.get("ckpt_path"):
        check_compatible(cfg.ckpt_path, module.hparams.config, module.state_dict())
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar it was told not to show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(datamodule, module, trainer, output_dir)


def saved_tokenizer(cfg: DictConfig) -> dict:
    """``{"tokenizer_file": ...}`` when the run continues from a checkpoint whose run saved a tokenizer (resume=,
    ckpt_path=): its token ids are that tokenizer's, so it is read back, never trained again."""
    if "tokenizer" not in cfg.data or cfg.data.get("tokenizer_file") or not cfg.get("ckpt_path"):
        return {}
    saved = Path(cfg.ckpt_path).expanduser().resolve().parents[1] / "tokenizer.json"
    return {"tokenizer_file": str(saved)} if saved.is_file() else {}


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
        run.module.shutdown()  # mode=pipeline: no worker process outlives its run
    summary_cb = next((c for c in run.trainer.callbacks if type(c).__name__ == "RunSummary"), None)
    summary = summary_cb.summary(run.trainer, run.module, "finished") if summary_cb else {}
    if summary.get("val_loss") and run.trainer.global_rank == 0:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in summary["val_loss"].items())
        log.info("final val loss: %s | %d steps in %.0f s, %.0f tokens/s | run dir: %s", losses, summary["steps"],
                 summary["wall_time_s"], summary["tokens_per_s"] or 0, run.output_dir)
        if summary.get("val_bpc"):  # text: the unit that compares tokenizers
            log.info("final val bits per character: %s",
                     ", ".join(f"{k} {v:.4f}" for k, v in summary["val_bpc"].items()))
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

    from locallearn.analysis.sweeps import LOCAL_KEYS
    from locallearn.config import under

    if not HydraConfig.initialized():
        return None
    keep = [o for o in HydraConfig.get().overrides.task
            if not under(o.lstrip("+~").split("=", 1)[0], (*LOCAL_KEYS, "resume", "ckpt_path", "hydra"))]
    return "python run.py " + " ".join([*keep, "chunks=1"])
