"""The chunk update, written once: zero the gradients, run the backward pass of the chunks' weighted local
losses, clip, step the optimizer and the schedule, and return what gets logged (:func:`update`).

Every execution strategy (:mod:`locallearn.training.strategies`, :mod:`locallearn.pipeline`), the LR range
test and the benchmark's bare loop form a chunk's update with it. They differ only in the backward pass
they hand it: :func:`joint_backward` (one backward of the weighted sum of local losses, every chunk's
graph alive at once) or :func:`sequential_backward` (forward, backward and free each chunk in turn, one
graph alive at a time: where local learning's activation-memory saving comes from). The gradient cut in
:meth:`ChunkedGPT.forward_chunk` makes the chunks' graphs disjoint, so both give the same gradients.
``loss_fn(k, h, logits)`` scores chunk k; a chunk whose weight is 0 is scored (for logging) but sends no
gradient.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from locallearn.model.chunked import ChunkedGPT


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
