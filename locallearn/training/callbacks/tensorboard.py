"""The TensorBoard layout: every chunk's curve of one metric on one chart, and the run's hyperparameters."""

import math

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from locallearn.training.chunk_metrics import bpc_divisor

# One chart per metric, every chunk's curve on it (tags are regular expressions for TensorBoard).
CHARTS = {
    "train loss": r"^train/loss/chunk\d+$",
    "val loss": r"^val/loss/chunk\d+$",
    "val bits per token": r"^val/bits_per_token/chunk\d+$",
    "val bits per character": r"^val/bpc/chunk\d+$",  # causal LM on text: comparable across tokenizers
    "val bits, summed over loss terms": r"^val/bits_sum/chunk\d+$",  # objective=span: MLM + SBO
    "val answer accuracy": r"^val/answer_acc/chunk\d+$",  # tasks (data=mqar|induction|khop) only
    "val answer loss": r"^val/answer_loss/chunk\d+$",
    "gradient norm": r"^train/grad_norm/chunk\d+$",
    "learning rate": r"^train/lr/chunk\d+$",
    "momentum": r"^train/momentum/chunk\d+$",
    "hypergradient": r"^train/hypergrad/chunk\d+$",
    "synthetic gradient: cosine to the true one": r"^train/synthetic/cosine/chunk\d+$",  # method=synthetic only
    "synthetic gradient: norm over the true one's": r"^train/synthetic/norm_ratio/chunk\d+$",
}


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class TensorBoardLayout(L.Callback):
    """Puts every chunk's curve of one metric on one shared chart (TensorBoard's Custom Scalars tab),
    and logs the hyperparameters with the final metrics at the end of fit (HParams tab)."""

    def on_fit_start(self, trainer, pl_module):
        tb = tensorboard_logger(trainer)
        if tb is None or trainer.global_rank != 0:
            return
        tb.experiment.add_custom_scalars({"per chunk": {title: ["Multiline", [tag]] for title, tag in CHARTS.items()}})

    def on_fit_end(self, trainer, pl_module):
        tb = tensorboard_logger(trainer)
        if tb is None or pl_module.final_val is None:
            return
        config = pl_module.hparams.config
        params = {"chunks": len(pl_module.net), "mode": pl_module.mode, "method": pl_module.method.name,
                  "seed": config.get("seed")}
        for group in ("model", "optim", "data"):
            for key, value in (config.get(group) or {}).items():
                if isinstance(value, (int, float, str, bool)) and not key.startswith("_"):
                    params[f"{group}.{key}"] = value
        corpus = getattr(trainer.datamodule, "provenance", None)
        if corpus:  # the corpus's name and the tokenizer as trained (bpe-1024), not only as asked
            params["data.corpus"], params["data.tokenizer"] = corpus["name"], corpus["tokenizer"]
        metrics = {f"hparams/val_loss/chunk{k + 1}": v for k, v in enumerate(pl_module.final_val)}
        metrics["hparams/best_val_loss"] = pl_module.best_val
        if (chars := bpc_divisor(pl_module)):
            for k, v in enumerate(pl_module.final_val):
                metrics[f"hparams/val_bpc/chunk{k + 1}"] = v / chars / math.log(2)
        for k, acc in enumerate((pl_module.final_answers or {}).get("acc", [])):
            metrics[f"hparams/answer_acc/chunk{k + 1}"] = acc
        tb.log_hyperparams(params, metrics)
