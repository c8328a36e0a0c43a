"""The pipeline's workers: rank k > 0 trains chunk k+1 until rank 0 says STOP.

For every training batch a worker receives the hand-off (and the batch's targets) from the rank before
it, runs its chunk forward, sends its own hand-off on *before* its backward, then updates its chunk
with the same :func:`locallearn.training.update.update` as every other strategy. Its train results go back
to rank 0 on the side channel; validation sums and chunk states when rank 0 asks for them.
"""

import contextlib
import os
import resource
import sys
import traceback

import torch

from locallearn.model.objectives import IGNORE, Prepared, answer_scores
from locallearn.pipeline.link import (
    LOAD,
    RESULT,
    STATE,
    STOP,
    TRAIN,
    VAL,
    VAL_END,
    Link,
    chunk_state,
    load_chunk_state,
    prepared_from,
)
from locallearn.pipeline.messages import BackwardMessages, metric_values
from locallearn.training.learner import LocalLearner
from locallearn.training.memory import metered
from locallearn.training.update import chunk_backward, update

PEER_LOST = 3  # exit code of a worker that stops because another process died


def autocast(precision: str, device: torch.device):
    """The context a worker runs its chunk's forward in: what Lightning's precision plugin gives rank 0's chunk
    (``bf16-mixed``: matmuls in bfloat16, weights and optimizer in float32; ``32-true``: nothing)."""
    if str(precision) in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ChunkWorker:
    """What a worker holds: chunk k of the model, its optimizer and schedule, its end of the method's backward
    messages, and its validation sums."""

    def __init__(self, module: LocalLearner, k: int, max_steps: int, device, link: Link, precision: str = "32-true"):
        self.module, self.k, self.device = module, k, device
        self.precision = precision
        self.messages = BackwardMessages(link, k, link.world, module.method)
        self.net = module.net.to(device)
        self.optimizer = module.optimizer_factory([g for g in module.param_groups() if g["chunk"] == k])
        self.max_steps = max_steps
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # before any schedule touches them
        self.scheduler = self.schedule(0)
        self.weight = module.loss_weights[k]
        self.activation_bytes = None
        self.measure_in = 2 if module.method.sends else 1
        self.val_sum = self.val_weight = 0.0
        self.answers = [0.0, 0.0, 0]  # summed answer loss, correct answers, answers (tasks only)

    def schedule(self, step: int):
        """The chunk's LR schedule as it stands at ``step`` (None without one)."""
        if self.module.scheduler_factory is None:
            return None
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):  # as at the start of a run
            g["lr"] = lr
        scheduler = self.module.scheduler_factory(self.optimizer, total_steps=self.max_steps)
        for _ in range(step):  # schedules are functions of the step: replay them to where the run is
            scheduler.step()
        return scheduler

    def train(self, handoff, prepared: Prepared, forward, step: int) -> list[float]:
        """One update of the chunk; ``forward(out)`` hands its output on. Returns loss, lr, grad norm, momentum and
        the method's metrics."""
        self.net.train()
        method = self.module.method

        def handed_on(out):
            forward(out)  # the next chunk can start now
            self.messages.handed_on(step)  # and the message of the step before comes in

        def backward_pass():
            loss_fn = lambda k, h, logits, part=None: self.module.chunk_loss(k, h, logits, prepared, part)  # noqa: E731
            with autocast(self.precision, self.device):
                _, loss, grad = chunk_backward(self.net, self.k, handoff, loss_fn, torch.Tensor.backward,
                                               self.weight, method, handed_on)
            self.messages.send_back(step, grad)
            return [loss]

        self.measure_in -= 1
        if self.measure_in == 0:  # the first step's (with a method, the second: the first has no message yet)
            backward_pass = metered(backward_pass, self.net.parameters(), self._measured)
        u = update(self.optimizer, self.net, [self.k], backward_pass, step, self.module.grad_clip, self.scheduler)
        return [float(u.losses[0]), u.lrs[0], float(u.norms[0]), u.momenta[0],
                *metric_values(method, self.k, self.messages.K)]

    def _measured(self, peak: int):
        self.activation_bytes = peak

    @torch.no_grad()
    def validate(self, handoff, prepared: Prepared, forward):
        self.net.eval()
        with autocast(self.precision, self.device):  # the loss too: under autocast, cross-entropy runs in float32
            out, h, logits = self.net.forward_chunk(self.k, handoff)
            forward(out)
            weight = float((prepared.targets != IGNORE).sum())
            self.val_sum += float(self.module.chunk_loss(self.k, h, logits, prepared)) * weight
            self.val_weight += weight
            if prepared.answer is not None:
                loss_sum, correct, count = answer_scores(logits, prepared)
                loss_total, correct_total, n = self.answers
                self.answers = [loss_total + float(loss_sum), correct_total + float(correct), n + count]


def worker_loop(link: Link, module: LocalLearner, max_steps: int, device, precision: str = "32-true") -> None:
    """Run chunk ``link.rank`` (from 0) until STOP: the body of every rank but 0."""
    k, K = link.rank, link.world
    chunk = ChunkWorker(module, k, max_steps, device, link, precision)
    plan = module.net.plan
    last = k == K - 1

    def pass_on(cmd, step, tensors):
        """What hands this chunk's output (and the batch's targets) to the next chunk."""
        def send(out):
            if not last:
                link.send(k + 1, cmd, step, [out[plan[k + 1].start], *tensors[1:]])
        return send

    while True:
        cmd, step, tensors = link.recv(k - 1)
        if cmd in (TRAIN, VAL):
            handoff, prepared = {plan[k].start: tensors[0].to(device)}, prepared_from(tensors[1:], device)
        if cmd == TRAIN:
            result = chunk.train(handoff, prepared, pass_on(TRAIN, step, tensors), step)
            link.send(0, TRAIN, step, [torch.tensor(result, dtype=torch.float32)], tag=RESULT)
        elif cmd == VAL:
            chunk.validate(handoff, prepared, pass_on(VAL, 0, tensors))
        elif cmd == VAL_END:
            if not last:
                link.send(k + 1, VAL_END)
            link.send_object(0, (chunk.val_sum, chunk.val_weight, chunk.answers))
            chunk.val_sum = chunk.val_weight = 0.0
            chunk.answers = [0.0, 0.0, 0]
        elif cmd == STATE:
            if not last:
                link.send(k + 1, STATE)
            chunk.messages.take()  # the message the next chunk still owes belongs in the state
            state = chunk_state(chunk.net, chunk.optimizer, k, module.method)
            state["activation_bytes"] = chunk.activation_bytes
            state["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            link.send_object(0, state)
        elif cmd == LOAD:
            if not last:
                link.send(k + 1, LOAD, step)
            load_chunk_state(chunk.net, chunk.optimizer, k, link.recv_object(0), module.method)
            chunk.messages.reset()
            chunk.scheduler = chunk.schedule(step)
        elif cmd == STOP:
            if not last:
                link.send(k + 1, STOP)
            chunk.messages.take()  # leave no send of the next chunk unmatched
            link.wait_sends()
            return


def serve(link: Link, cfg_dict: dict, vocab_size: int, device: str, threads: int, backend: str) -> None:
    """Build chunk ``link.rank``'s module from the run config and serve it until STOP."""
    from omegaconf import OmegaConf

    from locallearn.build import make_module, quiet_lightning
    from locallearn.config import instantiate
    from locallearn.model.chunked import make_net

    link.use_device(device, backend)
    torch.set_num_threads(threads)
    quiet_lightning()
    cfg = OmegaConf.create(cfg_dict)
    objective = instantiate(cfg.objective)
    torch.manual_seed(cfg.seed)
    net = make_net(cfg, objective, vocab_size)
    worker_loop(link, make_module(cfg, net, objective), int(cfg.trainer.max_steps), torch.device(device),
                str(cfg.trainer.get("precision", "32-true")))


def run_worker(rank: int, world: int, addr: str, port: int, *setup) -> None:
    """Entry point of a self-spawned worker process; ``setup`` is :func:`serve`'s arguments after the link."""
    link = None
    try:
        link = Link(rank, world, addr, port)
        serve(link, *setup)
    except Exception as e:  # noqa: BLE001 - a worker reports any failure to rank 0 and exits
        lost = isinstance(e, RuntimeError) and ("Connection closed" in str(e) or "Connection reset" in str(e))
        if link is not None and not lost:
            try:
                link.store.set(f"error{rank}", f"{type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                pass
        if not lost:
            traceback.print_exc()
        sys.stdout.flush()
        os._exit(PEER_LOST if lost else 1)


def worker_from_env() -> None:
    """A torchrun rank > 0 of a pipeline run: wait for rank 0's config and serve one chunk."""
    link = Link(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]))
    serve(link, *link.recv_object(0))
