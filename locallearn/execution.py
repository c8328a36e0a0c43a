"""Execution modes: how the chunks' local losses become gradients.

* ``joint``: one forward through all chunks, one backward of the weighted sum of local losses.
  Every chunk's graph is alive at once.
* ``sequential``: forward, backward and free each chunk in turn; only one chunk's graph is alive at
  a time, which is where local learning's activation-memory saving comes from.
* ``pipeline``: the sequential step of each chunk in its own process, all at once
  (:mod:`locallearn.pipeline`).

The gradient cut inside :meth:`ChunkedGPT.forward_chunk` makes the chunks' graphs disjoint, so both
modes produce the same gradients (and, with the same seed, the same updates). ``loss_fn(k, h, logits)``
scores chunk k; a chunk whose weight is 0 is scored (for logging) but sends no gradient.
"""

from collections.abc import Callable, Sequence

from locallearn.chunked import ChunkedGPT
from locallearn.errors import ConfigError


def _weighted(loss, w: float):
    return loss if w == 1 else w * loss


def joint_step(net: ChunkedGPT, idx, loss_fn: Callable, backward: Callable, weights: Sequence[float],
               penalty=None) -> list:
    """Accumulate every chunk's gradients; return the per-chunk losses (detached).

    Also the global phase of a local-to-global run (``net.local = False``), where ``penalty`` (EWC)
    joins the backward.
    """
    losses = [loss_fn(k, h, logits) for k, (h, logits) in enumerate(net(idx))]
    total = sum(_weighted(loss, w) for loss, w in zip(losses, weights) if w)
    backward(total if penalty is None else total + penalty)
    return [loss.detach() for loss in losses]


def sequential_step(net: ChunkedGPT, idx, loss_fn: Callable, backward: Callable, weights: Sequence[float]) -> list:
    losses, x = [], idx
    for k in range(len(net)):
        x, h, logits = net.forward_chunk(k, x)
        loss = loss_fn(k, h, logits)
        if weights[k]:
            backward(_weighted(loss, weights[k]))  # frees chunk k's graph before chunk k+1 builds its own
        losses.append(loss.detach())
    return losses


# pipeline runs each chunk's sequential step in its own process (locallearn.pipeline); inside one process
# (the LR range test, say) it is sequential.
MODES = {"joint": joint_step, "sequential": sequential_step, "pipeline": sequential_step}


def get_step(mode: str) -> Callable:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a known execution mode; use one of: {', '.join(MODES)}.")
    return MODES[mode]
