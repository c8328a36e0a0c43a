"""The chunk update, written once: zero the gradients, run the backward pass of the chunks' weighted local
losses, clip, step the optimizer and the schedule, and return what gets logged (:func:`update`).

Every execution strategy (:mod:`locallearn.training.strategies`, :mod:`locallearn.pipeline`), the LR range
test and the benchmark's bare loop form a chunk's update with it. They differ only in the backward pass
they hand it: :func:`joint_backward` (one backward of the weighted sum of local losses, every chunk's
graph alive at once) or :func:`sequential_backward` (forward, backward and free each chunk in turn, one
graph alive at a time: where local learning's activation-memory saving comes from). The gradient cut in
:meth:`ChunkedGPT.forward_chunk` makes the chunks' graphs disjoint, so both give the same gradients.
``loss_fn(k, h, logits)`` scores chunk k (``loss_fn(k, h, logits, part=)`` the share of positions ``part``, for
:func:`sliced_backward`); a chunk whose weight is 0 is scored (for logging) but sends no gradient. A ``method``
(:mod:`locallearn.training.methods`) adds its terms to each chunk's objective and collects the gradients chunks send
back to their inputs; without one, training is local.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from locallearn.model.chunked import ChunkedGPT


def weighted(loss: torch.Tensor, weight: float, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """``weight * loss + extra``: what a chunk backpropagates (None when nothing: weight 0, no extra term)."""
    own = (loss if weight == 1 else weight * loss) if weight else None
    return extra if own is None else own if extra is None else own + extra


def weighted_backward(loss: torch.Tensor, weight: float, backward: Callable, extra: torch.Tensor | None = None) -> None:
    """Backward ``weight * loss`` (+ a method's ``extra`` term); nothing for weight 0 and no extra term (the chunk
    is scored but not trained)."""
    objective = weighted(loss, weight, extra)
    if objective is not None:
        backward(objective)


def chunk_backward(net: ChunkedGPT, k: int, x, loss_fn: Callable, backward: Callable, weight: float,
                   method=None, handed_on: Callable | None = None):
    """Chunk k's forward and backward (and its method's terms): returns (hand-off, its loss (detached), the gradient
    of its cut input (None without a method that sends it back)). The one chunk step of sequential mode and of the
    pipeline's processes, which hand the output on between forward and backward (``handed_on(hand-off)``)."""
    sends = method is not None and method.sends
    if method is not None:
        method.start(net, k, x)
    sliced = net.loss_slices > 1 and weight and not (method is not None and method.uses_output)
    out, h, logits = net.forward_chunk(k, x, grad_input=sends, head=not sliced)
    if handed_on is not None:
        handed_on(out)
    # Backward here frees chunk k's graph before chunk k+1 builds its own.
    if sliced:
        loss = sliced_backward(net, k, h, loss_fn, backward, weight)
    else:
        loss = loss_fn(k, h, logits)
        weighted_backward(loss, weight, backward, method.with_loss(net, k, h) if method is not None else None)
    if method is not None:
        for term in method.apart(net, k):
            backward(term)
    return out, loss.detach(), out["input"].grad if sends and k else None


def sliced_backward(net: ChunkedGPT, k: int, h, loss_fn: Callable, backward: Callable, weight: float):
    """Chunk k's head and loss on ``net.loss_slices`` slices of the sequence, each backpropagated at once into a
    detached copy of its output ``h``, then ``h``'s gradient through the chunk: the head's activations (its
    LayerNorm's output, the log-probabilities) are alive for one slice at a time. Returns the loss (the slices'
    shares add up to it; the gradients are the whole loss's up to float rounding)."""
    out = h.detach().requires_grad_()
    T = h.shape[1]
    width = -(-T // net.loss_slices)
    loss = 0.0
    for start in range(0, T, width):
        part = slice(start, start + width)
        share = loss_fn(k, out[:, part], net.head(k, out[:, part]), part=part)
        weighted_backward(share, weight, backward)
        loss = loss + share.detach()
    h.backward(out.grad)  # not `backward`: a loss scaler (16-mixed) has scaled the shares' gradients already
    return loss


def joint_backward(net: ChunkedGPT, idx, loss_fn: Callable, backward: Callable, weights: Sequence[float],
                   penalty=None, method=None) -> list[torch.Tensor]:
    """Accumulate every chunk's gradients (and its method's terms) in one backward; return the per-chunk losses
    (detached).

    Also the global phase of a local-to-global run (``net.local = False``), where ``penalty`` (EWC)
    joins the backward.
    """
    sends = method is not None and method.sends
    losses, terms, inputs, x = [], [], [], idx
    for k in range(len(net)):
        if method is not None:
            method.start(net, k, x)
        x, h, logits = net.forward_chunk(k, x, grad_input=sends)
        losses.append(loss_fn(k, h, logits))
        inputs.append(x.get("input") if sends else None)
        if method is not None:
            terms += [t for t in (method.with_loss(net, k, h), *method.apart(net, k)) if t is not None]
    total = sum(weighted(loss, w) for loss, w in zip(losses, weights) if w) + sum(terms)
    backward(total if penalty is None else total + penalty)
    for k in range(1, len(net) if sends else 0):
        method.receive(k - 1, inputs[k].grad)
    return [loss.detach() for loss in losses]


def sequential_backward(net: ChunkedGPT, idx, loss_fn: Callable, backward: Callable,
                        weights: Sequence[float], method=None) -> list[torch.Tensor]:
    """Forward and backward each chunk in turn; return the per-chunk losses (detached)."""
    losses, x = [], idx
    for k in range(len(net)):
        x, loss, grad = chunk_backward(net, k, x, loss_fn, backward, weights[k], method)
        if grad is not None:
            method.receive(k - 1, grad)
        losses.append(loss)
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
    extra: dict | None = None  # what the method logs (metric name -> value), e.g. synthetic gradients' cosines


def update(optimizer, net: ChunkedGPT, chunks: Sequence[int], backward_pass: Callable[[], list[torch.Tensor]],
           step: int, grad_clip: float | None, scheduler=None, sync: Callable | None = None, hypergrad=None,
           global_phase: bool = False, method=None) -> Update:
    """The chunk update: zero the gradients, ``backward_pass()`` (returns the chunks' losses), ``sync()`` the
    gradients (data parallelism), adapt the LRs (``hypergrad``), clip, step the optimizer, then the schedule. The
    record carries what the ``method`` measured in the backward pass.

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
    extra = method.take_metrics() if method is not None else None
    return Update(step, list(chunks), losses, norms, lrs, momenta, total if global_phase else None, hypergrads,
                  extra or None)
