"""Execution modes: how the chunks' local losses become gradients.

* ``joint``: one forward through all chunks, one backward of the summed local losses. Every
  chunk's graph is alive at once.
* ``sequential``: forward, backward and free each chunk in turn; only one chunk's graph is alive at
  a time, which is where local learning's activation-memory saving comes from.

The gradient cut inside :meth:`ChunkedGPT.forward_chunk` makes the chunks' graphs disjoint, so both
modes produce the same gradients (and, with the same seed, the same updates).
"""

from collections.abc import Callable

from locallearn.chunked import ChunkedGPT
from locallearn.errors import ConfigError


def joint_step(net: ChunkedGPT, idx, targets, loss_fn: Callable, backward: Callable) -> list:
    """Accumulate every chunk's gradients; return the per-chunk losses (detached)."""
    losses = [loss_fn(logits, targets) for logits in net(idx)]
    backward(sum(losses))
    return [loss.detach() for loss in losses]


def sequential_step(net: ChunkedGPT, idx, targets, loss_fn: Callable, backward: Callable) -> list:
    losses, h = [], idx
    for k in range(len(net)):
        h, logits = net.forward_chunk(k, h)
        loss = loss_fn(logits, targets)
        backward(loss)  # frees chunk k's graph before chunk k+1 builds its own
        losses.append(loss.detach())
    return losses


MODES = {"joint": joint_step, "sequential": sequential_step}


def get_step(mode: str) -> Callable:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a known execution mode; use one of: {', '.join(MODES)}.")
    return MODES[mode]
