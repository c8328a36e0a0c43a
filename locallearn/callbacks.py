"""Callbacks that turn a run into the outputs a researcher reads: summary.json and TensorBoard layout."""

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

SUMMARY_CONFIG_KEYS = ("chunks", "mode", "seed", "model", "data", "chunking", "head", "objective", "optim",
                       "schedule", "grad_clip")


# One chart per metric, every chunk's curve on it (tags are regular expressions for TensorBoard).
CHARTS = {
    "train loss": r"^train/loss/chunk\d+$",
    "val loss": r"^val/loss/chunk\d+$",
    "val bits per token": r"^val/bpc/chunk\d+$",
    "gradient norm": r"^train/grad_norm/chunk\d+$",
    "learning rate": r"^train/lr/chunk\d+$",
}


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class TensorBoardLayout(L.Callback):
    """Puts every chunk's curve of one metric on one shared chart (TensorBoard's Custom Scalars tab),
    and logs the hyperparameters with the final metrics at the end of fit (HParams tab)."""

    def on_fit_start(self, trainer, pl_module):
        tb = _tensorboard(trainer)
        if tb is None or trainer.global_rank != 0:
            return
        tb.experiment.add_custom_scalars({"per chunk": {title: ["Multiline", [tag]] for title, tag in CHARTS.items()}})

    def on_fit_end(self, trainer, pl_module):
        tb = _tensorboard(trainer)
        if tb is None or pl_module.final_val is None:
            return
        config = pl_module.hparams.config
        params = {"chunks": len(pl_module.net), "mode": pl_module.mode, "seed": config.get("seed")}
        for group in ("model", "optim", "data"):
            for key, value in (config.get(group) or {}).items():
                if isinstance(value, (int, float, str, bool)) and not key.startswith("_"):
                    params[f"{group}.{key}"] = value
        metrics = {f"hparams/val_loss/chunk{k + 1}": v for k, v in enumerate(pl_module.final_val)}
        metrics["hparams/best_val_loss"] = pl_module.best_val
        tb.log_hyperparams(params, metrics)


class RunSummary(L.Callback):
    """Writes ``summary.json`` into the run directory at the end of fit (and if fit fails)."""

    def __init__(self, path):
        self.path = Path(path)
        self._start = None

    def on_fit_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def summary(self, trainer, pl_module, status: str) -> dict:
        config = pl_module.hparams.config
        datamodule = trainer.datamodule
        steps = trainer.global_step
        tokens_per_step = datamodule.tokens_per_batch if datamodule is not None else None
        final = pl_module.final_val
        counts = pl_module.net.parameter_counts()
        plan = pl_module.net.plan
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
            "steps": steps,
            "tokens_seen": steps * tokens_per_step if tokens_per_step else None,
            "wall_time_s": time.perf_counter() - self._start if self._start else None,
            "train_time_s": pl_module.train_seconds,
            "tokens_per_s": (pl_module.train_steps_timed * tokens_per_step / pl_module.train_seconds
                             if pl_module.train_seconds and tokens_per_step else None),
            "parameters": {f"chunk{k + 1}": c for k, c in enumerate(counts)},
            "flops_per_token": {f"chunk{k + 1}": f for k, f in enumerate(pl_module.flops_per_token or [])},
            "parameters_total": sum(p.numel() for p in pl_module.parameters()),
            "activation_bytes_peak": pl_module.activation_bytes,
            "cuda_peak_allocated_bytes": pl_module.cuda_peak_bytes,
            "unigram_entropy": datamodule.unigram_entropy() if datamodule is not None else None,
            "vocab_size": pl_module.net.gpt.config.vocab_size,
            "device": str(pl_module.device),
        }
        return out

    def _write(self, trainer, pl_module, status):
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.summary(trainer, pl_module, status), indent=2))

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "finished")

    def on_exception(self, trainer, pl_module, exception):
        self._write(trainer, pl_module, f"failed: {type(exception).__name__}: {exception}")
