"""Per-chunk metrics: each chunk's validation metrics (accumulated over one validation, computed and logged at its
end), and the TensorBoard metrics of one update."""

import math
import warnings

import torch
from torchmetrics import MeanMetric

from locallearn.errors import ConfigError


def _mean() -> MeanMetric:
    # A NaN batch makes the mean NaN (the diagnostics stop the run), where the default would drop it with a warning
    # and report a finite loss of a partly diverged model. (A float strategy keeps the weights; torchmetrics'
    # "disable" replaces every weight by 1.)
    return MeanMetric(nan_strategy=math.nan)


def bpc_divisor(module) -> float | None:
    """Characters per predicted validation token, where a val loss per token converts to bits per character: a
    causal LM (whose loss is the text's code length) on a text corpus. None otherwise (masked LM losses score
    masked tokens only, and generated data has no characters)."""
    data = module.trainer.datamodule if module._trainer is not None else None
    if module.objective.name != "clm" or data is None:
        return None
    return getattr(data, "val_chars_per_token", None)


def bits_per_character(loss: float, chars_per_token: float) -> float:
    """A mean loss per token (nats) as bits per character, with :func:`bpc_divisor`'s characters per token."""
    return loss / chars_per_token / math.log(2)


class ChunkMetrics(torch.nn.Module):
    """Per chunk: the loss over all targets (a batch weighted by its number of targets) and, on tasks
    (data=induction|mqar|khop), loss and accuracy on the answer tokens only. Every data-parallel rank computes
    them: computing syncs."""

    def __init__(self, K: int):
        super().__init__()
        self.loss = torch.nn.ModuleList(_mean() for _ in range(K))
        self.answer_loss = torch.nn.ModuleList(_mean() for _ in range(K))
        self.answer_acc = torch.nn.ModuleList(_mean() for _ in range(K))

    def add_loss(self, k: int, loss, weight: float):
        self.loss[k].update(loss, weight=weight)

    def add_answers(self, k: int, loss_sum, correct, count: int):
        """Add a batch's answer scores (see :func:`~locallearn.model.objectives.answer_scores`) to chunk k's."""
        if count:
            self.answer_loss[k].update(loss_sum / count, weight=count)
            self.answer_acc[k].update(correct / count, weight=count)

    @property
    def scored_batches(self) -> int:
        """Batches with targets in this process so far (those without are left out)."""
        return self.loss[0].update_count

    def reset(self):
        for metric in (*self.loss, *self.answer_loss, *self.answer_acc):
            metric.reset()

    def finish(self, module) -> tuple[list[float] | None, dict[str, list[float]] | None]:
        """At the end of a validation of ``module`` (a LocalLearner): log and return each chunk's val loss and, on a
        task's data, its answer loss and accuracy; resets them. (None, None) for a sanity check that scored nothing;
        a real validation that scored nothing is a one-sentence ConfigError."""
        trainer = module.trainer
        scored = self.scored_batches
        if trainer.world_size > 1:
            scored = int(trainer.strategy.reduce(torch.tensor(scored, device=module.device), reduce_op="sum"))
        if not scored:
            self.reset()
            if trainer.sanity_checking:  # its few batches may miss every target; the real validation decides
                return None, None
            data = trainer.datamodule
            raise ConfigError(f"objective={module.objective.name} put no target in any of the data.val_windows="
                              f"{data.val_windows} validation windows of data.block_size={data.block_size} tokens, "
                              f"so there is no validation loss; raise data.block_size or data.val_windows.")
        # A loss summing several cross-entropies (span: MLM + SBO) in bits is not a bits-per-token.
        bits = "bits_per_token" if module.objective.loss_terms == 1 else "bits_sum"
        chars = bpc_divisor(module)
        values = self.losses()
        for k, value in enumerate(values, start=1):
            module.log(f"val/loss/chunk{k}", value)
            module.log(f"val/{bits}/chunk{k}", value / math.log(2))
            if chars:
                module.log(f"val/bpc/chunk{k}", bits_per_character(value, chars))
        module.log("val/loss", values[-1], prog_bar=True)  # the model's own output: what checkpoints monitor
        answers = None
        if getattr(trainer.datamodule, "chance", None):  # a task's data
            answers = self.answers()
            for name, per_chunk in answers.items():
                for k, value in enumerate(per_chunk, start=1):
                    module.log(f"val/answer_{name}/chunk{k}", value)
            module.log("val/answer_acc", answers["acc"][-1], prog_bar=True)
        return values, answers

    def losses(self) -> list[float]:
        """Each chunk's val loss; resets them."""
        return [self._take(m) for m in self.loss]

    def answers(self) -> dict[str, list[float]]:
        """Each chunk's answer loss and accuracy (NaN where no answer was scored: mlm may mask none); resets them."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*before the ``update``.*")
            return {"loss": [self._take(m) for m in self.answer_loss], "acc": [self._take(m) for m in self.answer_acc]}

    @staticmethod
    def _take(metric: MeanMetric) -> float:
        value = float(metric.compute())
        metric.reset()
        return value


def update_metrics(u, losses: list[float] | None, momentum: bool, switch: bool, penalty=None) -> dict[str, float]:
    """The TensorBoard metrics of an :class:`~locallearn.training.strategies.Update` (``losses``: its chunks' losses as
    logged; None for a batch without targets), with the momentum (a schedule that cycles it), the phase (a run
    with a switch) and, in global steps, the total norm and the EWC penalty."""
    metrics = {}
    for i, k in enumerate(u.chunks):
        tag = f"chunk{k + 1}"
        if losses is not None:
            metrics[f"train/loss/{tag}"] = losses[i]
        metrics |= {f"train/grad_norm/{tag}": float(u.norms[i]), f"train/lr/{tag}": u.lrs[i]}
        if momentum:
            metrics[f"train/momentum/{tag}"] = u.momenta[i]
        if u.hypergrads is not None:
            metrics[f"train/hypergrad/{tag}"] = u.hypergrads[i]
    metrics |= {name: float(v) for name, v in (u.extra or {}).items()}
    if switch:
        metrics["train/global_phase"] = float(u.total_norm is not None)
    if u.total_norm is not None:  # the norm clipped in global steps; the chunk norms are its parts
        metrics["train/grad_norm/total"] = float(u.total_norm)
        if penalty is not None:
            metrics["train/ewc_penalty"] = float(penalty.detach())
    return metrics
