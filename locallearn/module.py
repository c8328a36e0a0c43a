"""The LightningModule: model + chunk plan + heads + objective + execution mode.

Optimization is manual because ``sequential`` mode needs one backward per chunk. There is one
optimizer with a decay and a no-decay param group per chunk (tagged ``chunk=k``), so
``trainer.global_step`` counts batches, each chunk's gradients are clipped on their own (in the
global phase of a local-to-global switch, the total norm, as end to end), and each chunk can have
its own learning rate (``optim.chunk_lr``), adapted online if asked (``optim.hypergrad_lr``).
Clipping, the LR scheduler and the hypergradient step are called here, in ``training_step``, as
manual optimization requires.
"""

import logging
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from torchmetrics import MeanMetric

from locallearn.chunked import ChunkedGPT
from locallearn.ddp import average_gradients
from locallearn.errors import ConfigError
from locallearn.execution import get_step, joint_step
from locallearn.hypergrad import HypergradientLR
from locallearn.memory import SavedTensorMeter
from locallearn.objectives import IGNORE, answer_scores
from locallearn.schedules import cycles_momentum
from locallearn.switch import EWC, FisherDiagonal, Switch, estimate_fisher, fisher_seed, token_terms

log = logging.getLogger(__name__)


def check_loss_weights(weights, K: int) -> list[float]:
    if weights is None:
        return [1.0] * K
    weights = [float(w) for w in weights]
    if len(weights) != K or any(w < 0 for w in weights) or not any(weights):
        raise ConfigError(f"loss_weights={weights} must hold {K} non-negative numbers (one per chunk), "
                          f"not all zero.")
    return weights


def check_chunk_lr(chunk_lr, K: int) -> list[float] | None:
    if chunk_lr is None:
        return None
    try:
        rates = [float(r) for r in chunk_lr]
    except (TypeError, ValueError):
        rates = []
    if len(rates) != K or not all(r > 0 for r in rates):
        raise ConfigError(f"optim.chunk_lr={list(chunk_lr) if rates else chunk_lr} must hold {K} positive learning "
                          f"rates (one per chunk), e.g. from analysis/lr_range_test.py, or be null for optim.lr.")
    return rates


def check_hypergrad_lr(beta) -> float | None:
    if beta is None:
        return None
    if not isinstance(beta, (int, float)) or beta <= 0:
        raise ConfigError(f"optim.hypergrad_lr={beta} must be a positive hypergradient step size (the paper uses "
                          f"about 1e-7 with Adam) or null to keep the schedule's learning rates.")
    return float(beta)


class LocalLearner(L.LightningModule):
    """Trains a :class:`ChunkedGPT`, each chunk on its own local loss.

    Args:
        net: the chunked model.
        objective: turns batches and outputs into losses (see :mod:`locallearn.objectives`).
        mode: ``joint`` or ``sequential`` (see :mod:`locallearn.execution`).
        optimizer: partial optimizer, called with the param groups.
        scheduler: partial LR scheduler, called with the optimizer and ``total_steps``; or None.
        grad_clip: max gradient norm per chunk (of all parameters together in global steps); None or 0: no clipping.
        loss_weights: one weight per chunk's local loss (default: all 1).
        switch: when (if ever) to switch from local to global training, and how.
        seed: seeds the objective's masking (per step in training; validation masks are fixed).
        config: the resolved run config, stored in checkpoints and summaries.
        chunk_lr: one learning rate per chunk (default: the optimizer's own).
        hypergrad_lr: hypergradient step size: adapt each chunk's LR online (see :mod:`locallearn.hypergrad`).
    """

    def __init__(self, net: ChunkedGPT, objective, mode: str = "joint", optimizer: Callable | None = None,
                 scheduler: Callable | None = None, grad_clip: float | None = 1.0,
                 loss_weights: list[float] | None = None, switch: Switch | None = None, seed: int = 0,
                 config: dict | None = None, chunk_lr: list[float] | None = None,
                 hypergrad_lr: float | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.net, self.objective, self.mode = net, objective, mode
        self.step_fn = get_step(mode)
        self.loss_weights = check_loss_weights(loss_weights, len(net))
        self.switch = switch or Switch()
        self.seed = seed
        self.ewc: EWC | None = None
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler
        self.grad_clip = grad_clip or None
        self.chunk_lr = check_chunk_lr(chunk_lr, len(net))
        self.hypergrad_lr = check_hypergrad_lr(hypergrad_lr)
        self.hypergrad: HypergradientLR | None = None  # built once the optimizer exists
        self._hypergrad_state: dict | None = None  # from a checkpoint, applied when it is built
        self.save_hyperparameters({"config": config or {}}, logger=False)
        K = len(net)
        # A NaN batch makes the val loss NaN (the diagnostics stop the run), where the default would drop it with
        # a warning and report a finite loss of a partly diverged model. (A float strategy keeps the weights;
        # torchmetrics' "disable" replaces every weight by 1.)
        self.val_loss = torch.nn.ModuleList(MeanMetric(nan_strategy=math.nan) for _ in range(K))
        self.final_val: list[float] | None = None  # per chunk, from the latest validation
        # Tasks (data=mqar|induction|khop): loss and accuracy on the answer tokens only, per chunk.
        self.answer_loss = torch.nn.ModuleList(MeanMetric(nan_strategy=math.nan) for _ in range(K))
        self.answer_acc = torch.nn.ModuleList(MeanMetric(nan_strategy=math.nan) for _ in range(K))
        self.final_answers: dict[str, list[float]] | None = None  # {"loss": per chunk, "acc": per chunk}
        self.best_val: float = math.inf  # last chunk
        self.activation_bytes: int | None = None  # peak bytes saved for backward in one step
        self.cuda_peak_bytes: int | None = None
        self.flops_per_token: list[dict[str, float]] | None = None  # forward, per chunk: trunk and head
        self.train_records: list[tuple[int, int, float, float]] = []  # (chunk, step, loss, lr) not yet read
        self.train_seconds = 0.0  # time spent in training steps (not validation) in this process
        self.train_steps_timed = 0
        self._measure_next = True
        self._t0 = None
        self._batch_tokens = 0

    # -- optimization ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Two param groups per chunk (tagged ``chunk=k``): matrices with weight decay, the rest without."""
        groups = []
        for k in range(len(self.net)):
            params = self.net.chunk_parameters(k)
            # Weight decay on matrices only: not on biases, LayerNorm gains or position-free vectors.
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            lr = {"lr": self.chunk_lr[k]} if self.chunk_lr else {}
            groups.append({"params": decay, "chunk": k, "name": f"chunk{k + 1}/decay", **lr})
            groups.append({"params": no_decay, "chunk": k, "name": f"chunk{k + 1}/no_decay", "weight_decay": 0.0,
                           **lr})
        return groups

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def clip_chunk(self, k: int) -> torch.Tensor:
        """Clip chunk k's gradient norm to ``grad_clip`` on its own; return the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.net.chunk_parameters(k), self.grad_clip or math.inf)

    def _clip(self, global_phase: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Clip the gradient norm to ``grad_clip``: each chunk's on its own in local steps, where each chunk
        is its own optimization problem; in global steps the total over all parameters, one factor for the
        whole model, as end-to-end training (``chunks=1``) does. Return each chunk's norm and the total norm,
        before clipping."""
        if not global_phase:
            norms = [self.clip_chunk(k) for k in range(len(self.net))]
            return norms, torch.linalg.vector_norm(torch.stack(norms))
        chunks = [[p for p in self.net.chunk_parameters(k) if p.grad is not None] for k in range(len(self.net))]
        norms = [torch.nn.utils.get_total_norm([p.grad for p in ps]) for ps in chunks]
        total = torch.nn.utils.get_total_norm(norms)  # the norm of the chunk norms is the norm of all gradients
        torch.nn.utils.clip_grads_with_norm_([p for ps in chunks for p in ps], self.grad_clip or math.inf, total)
        return norms, total

    # -- the local-to-global switch -------------------------------------------------------------
    @property
    def switch_step(self) -> int | None:
        return self.switch.step(self.trainer.max_steps) if self._trainer is not None else None

    def is_global(self, step: int) -> bool:
        at = self.switch_step
        return at is not None and step >= at

    def _earlier_chunk_params(self) -> dict[str, torch.nn.Parameter]:
        names = {id(p): n for n, p in self.net.named_parameters()}
        trunk = [p for k in range(len(self.net) - 1) for m in self.net.trunk_modules(k) for p in m.parameters()]
        return {names[id(p)]: p for p in trunk}

    def _start_global_phase(self, prepared):
        """At the switch: anchor the earlier chunks (EWC, if asked), then remove the cut."""
        if self.switch.ewc_lambda > 0 and len(self.net) > 1 and self.ewc is None:
            params = self._earlier_chunk_params()
            t0 = time.perf_counter()
            fisher = self._fisher(params, prepared)
            self.ewc = EWC(params, fisher.result(), fisher.tokens)
            log.info("EWC: %s Fisher of chunks 1-%d from %s tokens (%d batches) in %.1f s", self.switch.fisher,
                     len(self.net) - 1, "/".join(map(str, fisher.tokens.values())), self.switch.fisher_batches,
                     time.perf_counter() - t0)
        self.net.local = False

    def _fisher(self, params: dict[str, torch.nn.Parameter], prepared) -> FisherDiagonal:
        """Each earlier chunk's per-token Fisher of its local loss (see :func:`estimate_fisher`), on the batch at
        the switch and the ``switch.fisher_batches - 1`` training batches after it."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return estimate_fisher(self.net, params, self._fisher_batches(prepared), self._token_terms, self.switch.fisher,
                               lambda step, b, B: fisher_seed(self.seed, step, rank * B + b))

    def _fisher_batches(self, prepared):
        """(step, prepared batch): the batch at the switch, then the next training batches as the run will
        draw them (:meth:`RandomWindows.batch` by step, masks from the step's generator): drawing them here
        takes nothing from the run, which then trains on exactly these batches and masks."""
        step = self.global_step
        yield step, prepared
        if self.switch.fisher_batches > 1:
            windows = self.trainer.train_dataloader.dataset  # a RandomWindows: batch n is a function of n
            world = self.trainer.world_size
            for n in range(step + 1, step + self.switch.fisher_batches):
                batch = windows.batch(n).to(self.device)
                yield n, self.objective.prepare(batch, self._generator(n, train=True), self.trainer.global_rank,
                                                world)

    def _token_terms(self, k, h, logits, prepared):
        """Chunk k's predictions of the tokens its local loss scores (see :func:`token_terms`)."""
        extra = None
        if self.net.extra is not None:  # span: the span-boundary network predicts the same masked tokens
            sbo_logits, (b, t) = self.net.extra[k](h, prepared)
            extra = (sbo_logits, prepared.targets[b, t])
        return token_terms(logits, prepared.targets, IGNORE, extra)

    # -- training ---------------------------------------------------------------------------------
    def _loss(self, k, h, logits, prepared):
        extra = self.net.extra[k] if self.net.extra is not None else None
        return self.objective.loss(logits, h, prepared, extra)

    def _generator(self, step: int, train: bool) -> torch.Generator:
        # Training masks depend on (seed, step), so a resumed run masks exactly as the uninterrupted
        # one; validation masks depend on the batch only, so every evaluation scores the same task.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) if train else 998_244_353 + step)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        world = self.trainer.world_size
        # Masks are drawn for the combined batch of all data-parallel ranks; each rank keeps its own rows.
        prepared = self.objective.prepare(batch, self._generator(self.global_step, train=True),
                                          self.trainer.global_rank, world)
        self._batch_tokens = prepared.idx.numel()
        n_local = int((prepared.targets != IGNORE).sum())
        n_targets = n_local if world == 1 else int(self.trainer.strategy.reduce(
            torch.tensor(n_local, device=self.device), reduce_op="sum"))  # in the combined batch
        # A rank's loss is the mean over its own targets, and mlm/span masks give ranks different numbers of
        # them: weighted by the rank's share of the combined batch's targets, the ranks' averaged gradient
        # is the combined batch's (the weight is exactly 1 in one process and for clm).
        share = n_local * world / n_targets if n_targets else 1.0
        global_phase = self.is_global(self.global_step)
        if global_phase and self.net.local:
            self._start_global_phase(prepared)
        opt.zero_grad(set_to_none=True)

        def loss_fn(k, h, logits):
            loss = self._loss(k, h, logits, prepared)
            return loss if share == 1 else share * loss

        meter = SavedTensorMeter(self.net.parameters()) if self._measure_next else nullcontext()
        hypergrad = self.hypergrad
        penalty = None
        with meter:
            if global_phase:
                K = len(self.net)
                weights = [self.switch.aux_weight] * (K - 1) + [self.loss_weights[-1]]
                penalty = self.ewc.penalty(self.switch.ewc_lambda) if self.ewc is not None else None
                losses = joint_step(self.net, prepared.idx, loss_fn, self.manual_backward, weights, penalty)
            else:
                losses = self.step_fn(self.net, prepared.idx, loss_fn, self.manual_backward, self.loss_weights)
        if self._measure_next:
            self.activation_bytes, self._measure_next = meter.peak, False
        if self.trainer.world_size > 1:  # data parallel (trainer=ddp): the combined batch's gradient
            average_gradients(self.net.parameters())
        if hypergrad is not None:
            hypergrad.adapt()  # from the raw gradient, before clipping
        norms, total_norm = self._clip(global_phase)
        chunk_groups = opt.param_groups[::2]  # one group per chunk is enough: both share the LR
        lrs = [g["lr"] for g in chunk_groups]  # the LRs this step uses
        momenta = [g["betas"][0] if "betas" in g else g["momentum"] for g in chunk_groups] \
            if self._log_momentum else None
        if hypergrad is not None:
            hypergrad.before_step()
        opt.step()
        if hypergrad is not None:
            hypergrad.after_step()
        if self.lr_schedulers() is not None:
            self.lr_schedulers().step()
            if hypergrad is not None:
                hypergrad.apply()
        step = self.global_step - 1  # the step that just ran, as TensorBoard numbers it
        values = torch.stack(losses).float()
        if world > 1:  # the mean of the ranks' weighted losses is the combined batch's loss: every rank logs it
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        values = values.tolist()
        # A batch without targets (span masking in short windows) has no loss: its placeholder 0 is neither
        # recorded (the diagnostics would read it as a real value) nor logged.
        if n_targets:
            self.train_records += [(k + 1, step, v, lr) for k, (v, lr) in enumerate(zip(values, lrs))]
        if self._logs_at(step):
            metrics = {}
            for k, (loss, norm, lr) in enumerate(zip(values, norms, lrs), start=1):
                if n_targets:
                    metrics[f"train/loss/chunk{k}"] = loss
                metrics |= {f"train/grad_norm/chunk{k}": float(norm), f"train/lr/chunk{k}": lr}
                if momenta is not None:
                    metrics[f"train/momentum/chunk{k}"] = momenta[k - 1]
                if hypergrad is not None:
                    metrics[f"train/hypergrad/chunk{k}"] = hypergrad.last_hypergrad[k - 1]
            if self.switch.at is not None:
                metrics["train/global_phase"] = float(global_phase)
            if global_phase:  # the norm clipped in global steps; the chunk norms are its parts
                metrics["train/grad_norm/total"] = float(total_norm)
            if global_phase and penalty is not None:
                metrics["train/ewc_penalty"] = float(penalty.detach())
            self.log_train(metrics, step)
        if self.trainer.progress_bar_callback is not None and n_targets:
            self.log(f"train/loss/chunk{len(values)}", values[-1], prog_bar=True, logger=False)
        return {"losses": losses, "lrs": lrs}

    def _logs_at(self, step: int) -> bool:
        n = self.trainer.log_every_n_steps
        return (step + 1) % n == 0 or step + 1 == self.trainer.max_steps

    def log_train(self, metrics: dict[str, float], step: int):
        """Write training metrics straight to the loggers. (Lightning's ``self.log`` costs about 1.5 ms a call
        here, several per chunk per step: 12% of a model=small step at K=1, more with more chunks.)"""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def take_train_records(self) -> list[tuple[int, int, float, float]]:
        """The (chunk, step, loss, lr) of every chunk's training steps since the last call (the diagnostics
        read them; in mode=pipeline the other chunks' arrive a few steps late)."""
        records, self.train_records = self.train_records, []
        return records

    # -- timing: tokens/s over training steps only -------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self.train_seconds += dt
        self.train_steps_timed += 1
        if self._logs_at(self.global_step - 1):
            self.log_train({"train/tokens_per_s": self._batch_tokens / dt}, self.global_step - 1)
        if self.trainer.max_steps > 0 and self.global_step >= self.trainer.max_steps:
            # Lightning validates when a run is asked to stop: this makes the final step's validation
            # happen (and reach the checkpoint callback) even when max_steps is not a multiple of
            # val_check_interval.
            self.trainer.should_stop = True

    @property
    def process_activation_bytes(self) -> list[int | None]:
        """Peak bytes saved for backward in one step, per process (one here; one per chunk in mode=pipeline)."""
        return [self.activation_bytes]

    @property
    def _log_momentum(self) -> bool:
        return cycles_momentum(self.lr_schedulers())

    def on_fit_start(self):
        self.flops_per_token = self.net.flops_per_token(self.net.gpt.config.block_size)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_end(self):  # before on_fit_end, where the summary is written
        if self.device.type == "cuda":
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated(self.device)

    # -- validation -------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        # Masks depend on the batch index (and shape) only. Under trainer=ddp each rank's sampler hands it
        # every world-th window, so a ddp run scores other (equally fixed) masks than one process would.
        prepared = self.objective.prepare(batch, self._generator(batch_idx, train=False))
        weight = int((prepared.targets != IGNORE).sum())
        if not weight:  # nothing to score (span masking in short windows): the batch stays out of the mean
            return
        for k, (h, logits) in enumerate(self.net(prepared.idx)):
            self.val_loss[k].update(self._loss(k, h, logits, prepared), weight=weight)
            if prepared.answer is not None:
                self.update_answers(k, *answer_scores(logits, prepared))

    def update_answers(self, k: int, loss_sum, correct, count: int):
        """Add a batch's answer scores (see :func:`answer_scores`) to chunk k's answer metrics."""
        if count:
            self.answer_loss[k].update(loss_sum / count, weight=count)
            self.answer_acc[k].update(correct / count, weight=count)

    def on_validation_epoch_end(self):
        K = len(self.net)
        scored = self.val_loss[0].update_count  # batches with targets (those without are skipped)
        if self.trainer.world_size > 1:
            scored = int(self.trainer.strategy.reduce(torch.tensor(scored, device=self.device), reduce_op="sum"))
        if not scored:
            for metric in self.val_loss:
                metric.reset()
            if self.trainer.sanity_checking:  # its few batches may miss every target; the real validation decides
                return
            data = self.trainer.datamodule
            raise ConfigError(f"objective={self.objective.name} put no target in any of the data.val_windows="
                              f"{data.val_windows} validation windows of data.block_size={data.block_size} tokens, "
                              f"so there is no validation loss; raise data.block_size or data.val_windows.")
        # A loss summing several cross-entropies (span: MLM + SBO) in bits is not a bits-per-token.
        bits = "bpc" if self.objective.loss_terms == 1 else "bits_sum"
        values = []
        for k, metric in enumerate(self.val_loss):
            value = metric.compute()
            metric.reset()
            values.append(float(value))
            self.log(f"val/loss/chunk{k + 1}", value)
            self.log(f"val/{bits}/chunk{k + 1}", value / math.log(2))
        self.log("val/loss", values[-1], prog_bar=True)  # the model's own output: what checkpoints monitor
        answers = self._log_answers() if getattr(self.trainer.datamodule, "chance", None) else None
        if not self.trainer.sanity_checking:
            self.final_val = values
            self.best_val = min(self.best_val, values[K - 1])
            self.final_answers = answers

    def _log_answers(self) -> dict[str, list[float]]:
        """Log and return each chunk's answer loss and accuracy (a task's data only)."""
        out = {"loss": [], "acc": []}
        for k, (loss, acc) in enumerate(zip(self.answer_loss, self.answer_acc), start=1):
            for name, metric in (("loss", loss), ("acc", acc)):
                with warnings.catch_warnings():  # no answer scored (mlm may mask none): NaN, said by the value
                    warnings.filterwarnings("ignore", ".*before the ``update``.*")
                    value = float(metric.compute())  # every data-parallel rank computes: it syncs
                metric.reset()
                out[name].append(value)
                self.log(f"val/answer_{name}/chunk{k}", value)
        self.log("val/answer_acc", out["acc"][-1], prog_bar=True)
        return out

    # -- exact resume -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        # The data needs no state (batches are drawn by step); dropout needs the RNG.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["best_val"] = self.best_val
        if self.ewc is not None:
            checkpoint["ewc"] = self.ewc.state_dict()
        if self.hypergrad is not None:
            checkpoint["hypergrad"] = self.hypergrad.state_dict()

    def on_load_checkpoint(self, checkpoint):
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.best_val = checkpoint.get("best_val", math.inf)
        if "ewc" in checkpoint:
            self.ewc = EWC.from_state(self._earlier_chunk_params(), checkpoint["ewc"])
        self._hypergrad_state = checkpoint.get("hypergrad")

    def on_train_start(self):
        # A run resumed after the switch step continues without the cut (its EWC anchor comes from the
        # checkpoint); one resumed exactly at the switch step makes the switch in its first step.
        at = self.switch_step
        self.net.local = at is None or self.global_step <= at
        if self.hypergrad_lr is not None:
            self.hypergrad = HypergradientLR(self.optimizers().optimizer, self.hypergrad_lr)
            if self._hypergrad_state is not None:  # the optimizer's LRs already carry the multipliers
                self.hypergrad.load_state_dict(self._hypergrad_state)
