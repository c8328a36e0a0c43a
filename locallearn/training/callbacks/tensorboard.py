"""The TensorBoard layout: every chunk's curve of one metric on one chart, and the run's hyperparameters."""

import re
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from locallearn.training.chunk_metrics import bpc_divisor
from locallearn.training.hparams import final_metrics, run_hparams

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


def charts_for(tags) -> dict[str, str]:
    """The charts of CHARTS that some of ``tags`` (the metric names a run logged) would fill."""
    return {title: tag for title, tag in CHARTS.items() if any(re.match(tag, t) for t in tags)}


def write_session(log_dir: Path, hparams: dict, metrics: dict[str, float], step: int) -> None:
    """One HParams session in ``log_dir``: the run's hyperparameters, its final metrics, and its end.

    No experiment summary: TensorBoard takes the one of whichever run it reads first and shows only its columns
    (a 2-chunk run's would hide chunk3 of the others). Without one it builds the table from every session: the
    union of their hyperparameters, and of the scalars in their session directories (only these metrics, as
    the curves live one directory up)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    for old in log_dir.glob("events.out.tfevents.*"):  # a resumed run: its session is the one of its last fit
        old.unlink()
    _, start, end = hparams_summaries(hparams, metrics)
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.file_writer.add_summary(start)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        writer.file_writer.add_summary(end)


class TensorBoardLayout(L.Callback):
    """Puts every chunk's curve of one metric on one shared chart (TensorBoard's Custom Scalars tab), for the
    metrics the run logs, and writes the run's hyperparameters with its final metrics at the end of fit
    (the HParams tab, in ``tb/hparams``)."""

    def __init__(self):
        self.layout_written = False

    def on_validation_end(self, trainer, pl_module):
        # The charts are chosen once the run has logged both kinds of metric: after its first validation
        # that follows a training log (val_check_interval >= log_every_n_steps, as by default), else at the end.
        if not trainer.sanity_checking and any(t.startswith("train/") for t in pl_module.logged_tags):
            self._write_layout(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        self._write_layout(trainer, pl_module)
        tb = tensorboard_logger(trainer)
        if tb is None or pl_module.final_val is None or trainer.global_rank != 0:
            return
        metrics = final_metrics(pl_module, bpc_divisor(pl_module))
        write_session(Path(tb.log_dir) / "hparams", run_hparams(pl_module.hparams.config, pl_module, trainer),
                      metrics, trainer.global_step)

    def _write_layout(self, trainer, pl_module):
        tb = tensorboard_logger(trainer)
        if self.layout_written or tb is None or trainer.global_rank != 0:
            return
        charts = charts_for(pl_module.logged_tags | set(trainer.callback_metrics))
        tb.experiment.add_custom_scalars({"per chunk": {title: ["Multiline", [tag]] for title, tag in charts.items()}})
        self.layout_written = True
