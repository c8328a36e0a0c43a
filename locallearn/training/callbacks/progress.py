"""The progress bar of a run that counts steps: the training stream is endless, so an epoch has no end to show."""

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps up to ``trainer.max_steps`` (from the checkpoint's step when a run
    resumes), instead of Lightning's "Epoch 0/-2" over an endless epoch. The same bar whether or not ``rich`` is
    installed (Lightning would switch to its Rich bar then)."""

    def on_train_epoch_start(self, trainer, *_):
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.initial = bar.n = trainer.global_step
        bar.set_description("train step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: runs have their own directories, not versions
        return metrics
