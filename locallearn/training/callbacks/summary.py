"""``summary.json``: the numbers of a run a researcher reads first, written at the end of fit (and if fit fails)."""

import logging
import time
from pathlib import Path

import lightning as L
import torch

from locallearn.atomic import write_json
from locallearn.errors import TrainingDiverged
from locallearn.training.chunk_metrics import bits_per_character, bpc_divisor

log = logging.getLogger(__name__)

SUMMARY_CONFIG_KEYS = ("chunks", "mode", "seed", "model", "data", "boundaries", "overlap", "interlock", "method",
                       "head", "objective", "loss_weights", "switch", "optim", "schedule", "grad_clip")


def answer_fields(answers: dict | None, datamodule) -> dict:
    """The summary's answer metrics per chunk and their chance level (tasks only; nothing for corpora)."""
    chance = getattr(datamodule, "chance", None)
    if not chance:
        return {}
    def per_chunk(values):
        return {f"chunk{k + 1}": v for k, v in enumerate(values)}

    return {"answer_acc": per_chunk(answers["acc"]) if answers else None,
            "answer_loss": per_chunk(answers["loss"]) if answers else None, "chance": chance}


class RunSummary(L.Callback):
    """Writes ``summary.json`` into the run directory at the end of fit (and if fit fails). Times the training
    steps itself (validation left out): tokens/s in the summary, and ``train/tokens_per_s`` at logging steps."""

    def __init__(self, path):
        self.path = Path(path)
        self._start = self._t0 = None
        self.train_seconds, self.train_steps = 0.0, 0  # in this process

    def on_fit_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        self.train_seconds += dt
        self.train_steps += 1
        step = trainer.global_step - 1
        if pl_module.logs_at(step) and trainer.datamodule is not None:
            pl_module.log_train({"train/tokens_per_s": trainer.datamodule.tokens_per_batch / dt}, step)

    def summary(self, trainer, pl_module, status: str) -> dict:
        config = pl_module.hparams.config
        datamodule = trainer.datamodule
        steps = trainer.global_step
        tokens_per_step = datamodule.tokens_per_batch if datamodule is not None else None
        final = pl_module.final_val
        chars = bpc_divisor(pl_module)
        counts = pl_module.net.parameter_counts()
        plan = pl_module.net.plan
        per_process = pl_module.process_activation_bytes
        out = {
            "status": status,
            "config": {k: config[k] for k in SUMMARY_CONFIG_KEYS if k in config},
            "chunks": len(plan),
            "layers": [list(c.layers) for c in plan],
            "trained_layers": [list(c.trained) for c in plan],
            "loss_weights": pl_module.loss_weights,
            "switch_step": pl_module.switch_step,
            "val_loss": {f"chunk{k + 1}": v for k, v in enumerate(final)} if final else None,
            "best_val_loss": pl_module.best_val if final else None,
            # bits per character: a causal LM on text (the unit comparable across tokenizers)
            "val_bpc": ({f"chunk{k + 1}": bits_per_character(v, chars) for k, v in enumerate(final)}
                        if final and chars else None),
            "best_val_bpc": bits_per_character(pl_module.best_val, chars) if final and chars else None,
            **answer_fields(pl_module.final_answers, datamodule),
            "steps": steps,
            "tokens_seen": steps * tokens_per_step if tokens_per_step else None,
            "wall_time_s": time.perf_counter() - self._start if self._start else None,
            "train_time_s": self.train_seconds,
            "tokens_per_s": (self.train_steps * tokens_per_step / self.train_seconds
                             if self.train_seconds and tokens_per_step else None),
            "parameters": {f"chunk{k + 1}": c for k, c in enumerate(counts)},
            "flops_per_token": {f"chunk{k + 1}": f for k, f in enumerate(pl_module.flops_per_token or [])},
            "parameters_total": sum(p.numel() for p in pl_module.parameters()),
            # the most one process holds (in mode=pipeline each holds only its chunk's)
            "activation_bytes_peak": max((b for b in per_process if b is not None), default=None),
            "activation_bytes_per_process": per_process if len(per_process) > 1 else None,
            "cuda_peak_allocated_bytes": pl_module.cuda_peak_bytes,
            "unigram_entropy": datamodule.unigram_entropy() if datamodule is not None else None,
            "vocab_size": pl_module.net.gpt.config.vocab_size,
            "corpus": getattr(datamodule, "provenance", None),  # text: name, files (size, SHA-1), tokenizer
            "device": str(pl_module.device),
        }
        for cb in trainer.callbacks:  # callbacks that add their own results (the diagnostics)
            if hasattr(cb, "summary_fields"):
                out.update(cb.summary_fields(trainer))
        return out

    def _write(self, trainer, pl_module, status):
        if trainer.global_rank == 0:
            write_json(self.path, self.summary(trainer, pl_module, status))

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "finished")

    def on_exception(self, trainer, pl_module, exception):
        status = (f"diverged: {exception}" if isinstance(exception, TrainingDiverged)
                  else f"failed: {type(exception).__name__}: {exception}")
        try:
            self._write(trainer, pl_module, status)
        except OSError as e:  # the disk that failed the run may fail this too: the first error is the one to report
            log.warning("could not write %s: %s", self.path, e)
