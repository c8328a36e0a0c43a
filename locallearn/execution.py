"""Execution strategies: how a training batch becomes per-chunk updates.

Every strategy forms a chunk's update with the one function :func:`update`: zero the gradients, run the
backward pass of the chunks' weighted local losses, clip, step the optimizer and the schedule. They
differ only in how the backward pass runs and where:

* ``joint``: one forward through all chunks, one backward of the weighted sum of local losses.
  Every chunk's graph is alive at once.
* ``sequential``: forward, backward and free each chunk in turn; only one chunk's graph is alive at
  a time, which is where local learning's activation-memory saving comes from.
* ``pipeline``: each chunk in its own process, all at once (:mod:`locallearn.pipeline`); each chunk
  makes exactly the updates it makes in ``sequential``, which is how a pipeline runs inside one
  process (the LR range test, the benchmark's bare loop).

The gradient cut inside :meth:`ChunkedGPT.forward_chunk` makes the chunks' graphs disjoint, so all
three produce the same gradients (and, with the same seed, the same updates). ``loss_fn(k, h, logits)``
scores chunk k; a chunk whose weight is 0 is scored (for logging) but sends no gradient.

A new way of forming updates (synthetic or delayed gradients, say) is one new :class:`Strategy` and its
config file, ``conf/mode/<name>.yaml`` (``mode: <name>`` and a ``strategy`` node with its ``_target_``).
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from locallearn.chunked import ChunkedGPT


def weighted_backward(loss: torch.Tensor, weight: float, backward: Callable) -> None:
    """Backward ``weight * loss`` (nothing for weight 0: the chunk is scored but not trained)."""
    if weight:
        backward(loss if weight == 1 else weight * loss)


def joint_backward(net: ChunkedGPT, idx, loss_fn: Callable, backward: Callable, weights: Sequence[float],
                   penalty=None) -> list[torch.Tensor]:
    """Accumulate every chunk's gradients in one backward; return the per-chunk losses (detached).

    Also the global phase of a local-to-global run (``net.local = False``), where ``penalty`` (EWC)
    joins the backward.
    """
    losses = [loss_fn(k, h, logits) for k, (h, logits) in enumerate(net(idx))]
    total = sum((loss if w == 1 else w * loss) for loss, w in zip(losses, weights) if w)
    backward(total if penalty is None else total + penalty)
    return [loss.detach() for loss in losses]


def sequential_backward(net: ChunkedGPT, idx, loss_fn: Callable, backward: Callable,
                        weights: Sequence[float]) -> list[torch.Tensor]:
    """Forward and backward each chunk in turn; return the per-chunk losses (detached)."""
    losses, x = [], idx
    for k in range(len(net)):
        x, h, logits = net.forward_chunk(k, x)
        loss = loss_fn(k, h, logits)
        weighted_backward(loss, weights[k], backward)  # frees chunk k's graph before chunk k+1 builds its own
        losses.append(loss.detach())
    return losses


def clip_gradients(net: ChunkedGPT, chunks: Sequence[int], max_norm: float | None,
                   global_phase: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip the gradient norm to ``max_norm`` (None: measure only): each chunk's on its own in local steps,
    where each chunk is its own optimization problem; in global steps the total over all of ``chunks``, one
    factor for the whole model, as end-to-end training (``chunks=1``) does. Return each chunk's norm and
    the total norm, before clipping."""
    limit = max_norm or math.inf
    if not global_phase:
        norms = [torch.nn.utils.clip_grad_norm_(net.chunk_parameters(k), limit) for k in chunks]
        return norms, torch.linalg.vector_norm(torch.stack(norms))
    params = [[p for p in net.chunk_parameters(k) if p.grad is not None] for k in chunks]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in ps]) for ps in params]
    total = torch.nn.utils.get_total_norm(norms)  # the norm of the chunk norms is the norm of all gradients
    torch.nn.utils.clip_grads_with_norm_([p for ps in params for p in ps], limit, total)
    return norms, total


def chunk_param_groups(net: ChunkedGPT, chunk_lr: Sequence[float] | None = None) -> list[dict]:
    """Two param groups per chunk, tagged ``chunk=k``: matrices with weight decay, the rest (biases, LayerNorm
    gains) without; with ``chunk_lr``, each chunk's own learning rate."""
    groups = []
    for k in range(len(net)):
        params = net.chunk_parameters(k)
        lr = {"lr": chunk_lr[k]} if chunk_lr else {}
        groups.append({"params": [p for p in params if p.dim() >= 2], "chunk": k, "name": f"chunk{k + 1}/decay", **lr})
        groups.append({"params": [p for p in params if p.dim() < 2], "chunk": k, "name": f"chunk{k + 1}/no_decay",
                       "weight_decay": 0.0, **lr})
    return groups


@dataclass
class Update:
    """What one update did to each chunk it updated: what a run logs and records."""

    step: int  # the training step (batch) it belongs to
    chunks: list[int]  # from 0
    losses: list[torch.Tensor]  # each chunk's local loss (detached; unweighted)
    norms: list[torch.Tensor | float]  # each chunk's gradient norm before clipping
    lrs: list[float]  # the learning rate the step used
    momenta: list[float]  # Adam's beta1 or SGD's momentum the step used
    total_norm: torch.Tensor | float | None = None  # the norm clipped in a global step
    hypergrads: list[float] | None = None  # the hypergradient of each chunk's LR (optim.hypergrad_lr)


def update(optimizer, net: ChunkedGPT, chunks: Sequence[int], backward_pass: Callable[[], list[torch.Tensor]],
           step: int, grad_clip: float | None, scheduler=None, sync: Callable | None = None, hypergrad=None,
           global_phase: bool = False) -> Update:
    """The chunk update: zero the gradients, ``backward_pass()`` (returns the chunks' losses), ``sync()`` the
    gradients (data parallelism), adapt the LRs (``hypergrad``), clip, step the optimizer, then the schedule.

    ``optimizer``'s param groups are tagged ``chunk=k``; it may hold more chunks than ``chunks`` (those
    have no gradient and are left alone).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = backward_pass()
    if sync is not None:
        sync()
    if hypergrad is not None:
        hypergrad.adapt()  # from the raw gradient, before clipping
    norms, total = clip_gradients(net, chunks, grad_clip, global_phase)
    first = {}
    for g in optimizer.param_groups:  # a chunk's groups share its LR and momentum: read its first
        first.setdefault(g["chunk"], g)
    groups = [first[k] for k in chunks]
    lrs = [g["lr"] for g in groups]
    momenta = [g["betas"][0] if "betas" in g else g.get("momentum", math.nan) for g in groups]
    if hypergrad is not None:
        hypergrad.before_step()
    optimizer.step()
    if hypergrad is not None:
        hypergrad.after_step()
    if scheduler is not None:
        scheduler.step()
        if hypergrad is not None:
            hypergrad.apply()
    hypergrads = [hypergrad.last_hypergrad[k] for k in chunks] if hypergrad is not None else None
    return Update(step, list(chunks), losses, norms, lrs, momenta, total if global_phase else None, hypergrads)


class Strategy:
    """How a :class:`~locallearn.module.LocalLearner` turns a batch into per-chunk updates (training) and
    per-chunk outputs (validation). The hooks are for strategies that run chunks elsewhere (the pipeline)."""

    name = ""
    # The backward pass of all chunks in one process: what the LR range test and the bare benchmark loop run.
    backward = staticmethod(sequential_backward)

    @staticmethod
    def check(cfg) -> None:
        """Refuse, in one sentence, a run config this strategy cannot run (before anything is built)."""

    def train_step(self, module, prepared, loss_fn: Callable, step: int) -> list[Update]:
        """Train on one batch; return the updates whose results are known now (for any chunk and step)."""
        net = module.net
        return [module.update(lambda: self.backward(net, prepared.idx, loss_fn, module.manual_backward,
                                                    module.loss_weights), range(len(net)), step)]

    def validation_outputs(self, module, prepared) -> Iterable[tuple[int, torch.Tensor, torch.Tensor]]:
        """(k, h, logits) of every chunk scored in this process."""
        for k, (h, logits) in enumerate(module.net(prepared.idx)):
            yield k, h, logits

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, module) -> None:
        """At the start of fit."""

    def on_train_start(self, module) -> None:
        """After Lightning restored a checkpoint, before the first training step."""

    def on_validation_start(self, module) -> None:
        pass

    def end_validation(self, module) -> None:
        """Before the validation metrics are computed: add what other processes scored."""

    def on_train_end(self, module) -> None:
        pass

    def teardown(self, module, graceful: bool = True) -> None:
        """At the end of fit, however it ends."""

    def process_activation_bytes(self, module) -> list[int | None]:
        """Peak bytes saved for backward in one step, per process."""
        return [module.activation_bytes]

    def worker_rss_bytes(self) -> list[int]:
        """Peak resident memory of the processes besides this one."""
        return []


class Joint(Strategy):
    name = "joint"
    backward = staticmethod(joint_backward)


class Sequential(Strategy):
    name = "sequential"
