"""The LightningModule: model + chunk plan + heads + objective + execution strategy.

How a batch becomes per-chunk updates is the strategy's (:mod:`locallearn.training.strategies`); this module never
branches on the mode. Optimization is manual because ``sequential`` mode needs one backward per chunk. There is one
optimizer with a decay and a no-decay param group per chunk (tagged ``chunk=k``), so ``trainer.global_step`` counts
batches, each chunk's gradients are clipped on their own (in the global phase of a local-to-global switch, the total
norm, as end to end), and each chunk can have its own learning rate (``optim.chunk_lr``), adapted online if asked
(``optim.hypergrad_lr``).
Manual optimization leaves clipping, the LR scheduler and the hypergradient step to us: every strategy
calls them through :meth:`LocalLearner.update`, the one chunk update (:func:`locallearn.training.update.update`).
"""

import logging
import math
from collections.abc import Callable
from functools import partial

import lightning as L
import torch

from locallearn.model.chunked import ChunkedGPT
from locallearn.model.objectives import IGNORE, answer_scores
from locallearn.training.checkpoint import restore_rng_state, rng_state
from locallearn.training.chunk_metrics import ChunkMetrics, update_metrics
from locallearn.training.ddp import average_gradients
from locallearn.training.hypergrad import HypergradientLR
from locallearn.training.memory import metered
from locallearn.training.methods import Local, Method
from locallearn.training.schedules import cycles_momentum
from locallearn.training.strategies import Joint, Strategy
from locallearn.training.switch import EWC, Switch, earlier_chunk_params, start_global_phase
from locallearn.training.update import Update, chunk_param_groups, joint_backward, update

log = logging.getLogger(__name__)


class LocalLearner(L.LightningModule):
    """Trains a :class:`ChunkedGPT`, each chunk on its own local loss.

    Args:
        net: the chunked model.
        objective: turns batches and outputs into losses (see :mod:`locallearn.model.objectives`).
        strategy: how a batch becomes per-chunk updates (see :mod:`locallearn.training.strategies`); default joint.
        optimizer: partial optimizer, called with the param groups.
        scheduler: partial LR scheduler, called with the optimizer and ``total_steps``; or None.
        grad_clip: max gradient norm per chunk (of all parameters together in global steps); None or 0: no clipping.
        loss_weights: one weight per chunk's local loss (default: all 1).
        switch: when (if ever) to switch from local to global training, and how.
        seed: seeds the objective's masking (per step in training; validation masks are fixed).
        run_config: the resolved run config, stored in checkpoints (as ``config``) and summaries.
        chunk_lr: one learning rate per chunk (default: the optimizer's own).
        hypergrad_lr: hypergradient step size: adapt each chunk's LR online (see :mod:`locallearn.training.hypergrad`).
        method: what chunks send back across the cut (see :mod:`locallearn.training.methods`); default nothing (local).
    """

    def __init__(self, net: ChunkedGPT, objective, strategy: Strategy | None = None, optimizer: Callable | None = None,
                 scheduler: Callable | None = None, grad_clip: float | None = 1.0,
                 loss_weights: list[float] | None = None, switch: Switch | None = None, seed: int = 0,
                 run_config: dict | None = None, chunk_lr: list[float] | None = None,
                 hypergrad_lr: float | None = None, method: Method | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.net, self.objective = net, objective
        self.strategy = strategy or Joint()
        self.method = method or Local()
        self.loss_weights = [float(w) for w in loss_weights] if loss_weights is not None else [1.0] * len(net)
        self.switch, self.seed, self.ewc = switch or Switch(), seed, None  # ewc: built at the switch
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler
        self.grad_clip = grad_clip or None
        self.chunk_lr = [float(r) for r in chunk_lr] if chunk_lr is not None else None
        self.hypergrad_lr = float(hypergrad_lr) if hypergrad_lr is not None else None
        self.hypergrad: HypergradientLR | None = None  # built once the optimizer exists
        self._hypergrad_state: dict | None = None  # from a checkpoint, applied when it is built
        self.save_hyperparameters({"config": run_config or {}}, logger=False)
        self.metrics = ChunkMetrics(len(net))  # validation, per chunk
        self.final_val: list[float] | None = None  # per chunk, from the latest validation
        self.logged_tags: set[str] = set()  # the training metrics written so far (TensorBoard charts only these)
        self.final_answers: dict[str, list[float]] | None = None  # {"loss": per chunk, "acc": per chunk}: tasks
        self.best_val: float = math.inf  # last chunk
        self.activation_bytes: int | None = None  # peak bytes saved for backward in one step
        self.cuda_peak_bytes: int | None = None
        self.flops_per_token: list[dict[str, float]] | None = None  # forward, per chunk: trunk and head
        self.train_records: list[tuple[int, int, float, float]] = []  # (chunk, step, loss, lr) not yet read
        self.no_target_steps: set[int] = set()  # steps whose batch had nothing to score (no loss to record)
        self._measure_in = 2 if self.method.sends else 1  # the step measured: a method's first has no message yet

    # -- optimization ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Two param groups per chunk (see :func:`~locallearn.training.strategies.chunk_param_groups`)."""
        return chunk_param_groups(self.net, self.chunk_lr)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- the local-to-global switch -------------------------------------------------------------
    @property
    def switch_step(self) -> int | None:
        return self.switch.step(self.trainer.max_steps) if self._trainer is not None else None

    def is_global(self, step: int) -> bool:
        at = self.switch_step
        return at is not None and step >= at

    # -- training ---------------------------------------------------------------------------------
    def chunk_loss(self, k: int, h, logits, prepared, part: slice | None = None) -> torch.Tensor:
        """Chunk k's local loss from its output ``h`` and its head's ``logits`` (positions ``part``'s share)."""
        if part is not None:
            return self.objective.loss_part(logits, prepared, part)
        extra = self.net.extra[k] if self.net.extra is not None else None
        return self.objective.loss(logits, h, prepared, extra)

    def backward_pass(self, prepared, backward: Callable = torch.Tensor.backward) -> Callable[[], list[torch.Tensor]]:
        """Every chunk's backward pass on a prepared batch, in this process, as the strategy runs it there: what
        the LR range test and the benchmark's bare loop pass to :func:`~locallearn.training.update.update`."""
        loss_fn = partial(self.chunk_loss, prepared=prepared)
        return partial(self.strategy.backward, self.net, prepared.idx, loss_fn, backward, self.loss_weights,
                       method=self.method)

    def mask_generator(self, step: int, train: bool) -> torch.Generator:
        """The generator of a batch's masks (mlm, span). Training masks depend on (seed, step), so a resumed run
        masks exactly as the uninterrupted one; validation masks depend on the batch only, so every evaluation
        scores the same task."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) if train else 998_244_353 + step)

    def update(self, backward_pass, chunks, step: int, global_phase: bool = False) -> Update:
        """:func:`locallearn.training.update.update` with this run's optimizer, schedule, clipping, data parallelism and
        LR adaptation (what a strategy calls for the chunks it trains in this process)."""
        self._measure_in -= 1
        if self._measure_in == 0:  # that step's peak of activations saved for backward
            backward_pass = metered(backward_pass, self.net.parameters(), self._measured)
        sync = (lambda: average_gradients(self.net.parameters())) if self.trainer.world_size > 1 else None
        return update(self.optimizers(), self.net, chunks, backward_pass, step, self.grad_clip,
                      self.lr_schedulers(), sync, self.hypergrad, global_phase, self.method)

    def _measured(self, peak: int):
        self.activation_bytes = peak

    def training_step(self, batch, batch_idx):
        world = self.trainer.world_size
        step = self.global_step
        # Masks are drawn for the combined batch of all data-parallel ranks; each rank keeps its own rows.
        prepared = self.objective.prepare(batch, self.mask_generator(step, train=True), self.trainer.global_rank,
                                          world)
        n_local = int((prepared.targets != IGNORE).sum())
        n_targets = n_local if world == 1 else int(self.trainer.strategy.reduce(
            torch.tensor(n_local, device=self.device), reduce_op="sum"))  # in the combined batch
        if not n_targets:  # span masking in short windows: no loss this step; its placeholder 0 is not recorded
            self.no_target_steps.add(step)
        # A rank's loss is the mean over its own targets, and mlm/span masks give ranks different numbers of
        # them: weighted by the rank's share of the combined batch's targets, the ranks' averaged gradient
        # is the combined batch's (the weight is exactly 1 in one process and for clm).
        share = n_local * world / n_targets if n_targets else 1.0

        def loss_fn(k, h, logits, part=None):
            loss = self.chunk_loss(k, h, logits, prepared, part)
            return loss if share == 1 else share * loss

        global_phase = self.is_global(step)
        penalty = None
        if global_phase:  # end to end over the whole model, whatever the mode (no pipeline: it is refused)
            if self.net.local:
                start_global_phase(self, prepared)
            K = len(self.net)
            weights = [self.switch.aux_weight] * (K - 1) + [self.loss_weights[-1]]
            penalty = self.ewc.penalty(self.switch.ewc_lambda) if self.ewc is not None else None
            updates = [self.update(lambda: joint_backward(self.net, prepared.idx, loss_fn, self.manual_backward,
                                                          weights, penalty), range(K), step, global_phase=True)]
        else:
            updates = self.strategy.train_step(self, prepared, loss_fn, step)
        for u in updates:
            self.record_update(u, penalty)
        now = [u for u in updates if u.step == step]  # this batch's (in mode=pipeline chunk 1's only, yet)
        losses, lrs = [v for u in now for v in u.losses], [v for u in now for v in u.lrs]
        K = len(self.net)
        if self.trainer.progress_bar_callback is not None and step not in self.no_target_steps and len(losses) == K:
            self.log(f"train/loss/chunk{K}", float(losses[-1]), prog_bar=True, logger=False)
        return {"losses": losses, "lrs": lrs}

    def record_update(self, u: Update, penalty=None):
        """Record an update's losses for the diagnostics and log it to TensorBoard (at logging steps)."""
        values = torch.stack(u.losses).float()
        if self.trainer.world_size > 1:  # the mean of the ranks' weighted losses is the combined batch's loss
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        values = values.tolist()
        scored = u.step not in self.no_target_steps
        if scored:
            self.train_records += [(k + 1, u.step, v, lr) for k, v, lr in zip(u.chunks, values, u.lrs)]
        if not self.logs_at(u.step):
            return
        metrics = update_metrics(u, values if scored else None, cycles_momentum(self.lr_schedulers()),
                                 self.switch.at is not None, penalty)
        self.log_train(metrics, u.step)

    def logs_at(self, step: int) -> bool:
        n = self.trainer.log_every_n_steps
        return (step + 1) % n == 0 or step + 1 == self.trainer.max_steps

    def log_train(self, metrics: dict[str, float], step: int):
        """Write training metrics straight to the loggers (``self.log`` costs ~1.5 ms a call, 12% of a step)."""
        self.logged_tags.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def take_train_records(self) -> list[tuple[int, int, float, float]]:
        """The (chunk, step, loss, lr) of every chunk's training steps since the last call (the diagnostics
        read them; in mode=pipeline the other chunks' arrive a few steps late)."""
        records, self.train_records = self.train_records, []
        return records

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.max_steps > 0 and self.global_step >= self.trainer.max_steps:
            # Lightning validates when a run is asked to stop: this makes the final step's validation
            # happen (and reach the checkpoint callback) even when max_steps is not a multiple of
            # val_check_interval.
            self.trainer.should_stop = True

    @property
    def mode(self) -> str:
        return self.strategy.name

    @property
    def process_activation_bytes(self) -> list[int | None]:
        """Peak bytes saved for backward in one step, per process (one per chunk in mode=pipeline)."""
        return self.strategy.process_activation_bytes(self)

    def on_fit_start(self):
        self.flops_per_token = self.net.flops_per_token(self.net.gpt.config.block_size)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.strategy.setup(self)

    def on_train_end(self):  # before on_fit_end, where the summary is written
        if self.device.type == "cuda":
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        self.strategy.on_train_end(self)

    def on_validation_start(self):
        self.strategy.on_validation_start(self)

    def on_fit_end(self):
        self.strategy.teardown(self)

    def shutdown(self):
        """End whatever the strategy runs besides this process (``train`` calls it when fit ends, however it ends)."""
        self.strategy.teardown(self, graceful=False)

    # -- validation -------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        # Masks depend on the batch index (and shape) only. Under trainer=ddp each rank's sampler hands it
        # every world-th window, so a ddp run scores other (equally fixed) masks than one process would.
        prepared = self.objective.prepare(batch, self.mask_generator(batch_idx, train=False))
        weight = int((prepared.targets != IGNORE).sum())
        if not weight:  # nothing to score (span masking in short windows): the batch stays out of the mean
            return
        for k, h, logits in self.strategy.validation_outputs(self, prepared):
            self.metrics.add_loss(k, self.chunk_loss(k, h, logits, prepared), weight)
            if prepared.answer is not None:
                self.metrics.add_answers(k, *answer_scores(logits, prepared))

    def on_validation_epoch_end(self):
        self.strategy.end_validation(self)  # the chunks other processes scored
        values, answers = self.metrics.finish(self)
        if values is not None and not self.trainer.sanity_checking:
            self.final_val = values
            self.best_val = min(self.best_val, values[-1])
            self.final_answers = answers

    # -- exact resume -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["rng"] = rng_state()  # the data needs no state (batches are drawn by step); dropout needs it
        checkpoint["best_val"] = self.best_val
        if self.ewc is not None:
            checkpoint["ewc"] = self.ewc.state_dict()
        if self.hypergrad is not None:
            checkpoint["hypergrad"] = self.hypergrad.state_dict()
        checkpoint["method"] = self.method.state_dict()  # what its next step needs (last outputs, messages)

    def on_load_checkpoint(self, checkpoint):
        restore_rng_state(checkpoint.get("rng", {}))
        self.best_val = checkpoint.get("best_val", math.inf)
        if "ewc" in checkpoint:
            self.ewc = EWC.from_state(earlier_chunk_params(self.net), checkpoint["ewc"])
        self._hypergrad_state = checkpoint.get("hypergrad")
        self.method.load_state_dict(checkpoint.get("method", {}))

    def on_train_start(self):
        # A run resumed after the switch step continues without the cut (its EWC anchor comes from the
        # checkpoint); one resumed exactly at the switch step makes the switch in its first step.
        at = self.switch_step
        self.net.local = at is None or self.global_step <= at
        if self.hypergrad_lr is not None:
            self.hypergrad = HypergradientLR(self.optimizers().optimizer, self.hypergrad_lr)
            if self._hypergrad_state is not None:  # the optimizer's LRs already carry the multipliers
                self.hypergrad.load_state_dict(self._hypergrad_state)
        self.strategy.on_train_start(self)
