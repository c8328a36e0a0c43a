"""A method's backward messages in ``mode=pipeline``: the gradient chunk k+1 sends to chunk k, one step behind.

Chunk k hands its output of step t on, then takes the message of step t-1 (chunk k+1 sent it after its backward of
step t-1, which ran while chunk k worked on step t), so neither waits in a balanced pipeline; the message of step t
arrives while chunk k hands on step t+1. Chunk k's updates are those of ``sequential`` mode, which also uses the
message of the step before (:mod:`locallearn.training.methods`). Before its state is pulled or the run stops, a
chunk takes the message still owed to it, so checkpoints hold it and no send is left unmatched.
"""

import math
from collections.abc import Callable

import torch

from locallearn.pipeline.link import GRAD, TRAIN, Link

# What a chunk sends when its objective sent no gradient to its input (its loss weight is 0 and its method adds no
# term there): the chunk before must still get a message for every step, and gets nothing to apply, as in one process.
NO_MESSAGE = torch.full((1,), math.nan)


class BackwardMessages:
    """Chunk ``k``'s end of the messages: what it owes chunk k-1 and what chunk k+1 owes it."""

    def __init__(self, link: Link, k: int, K: int, method, guard: Callable = lambda fn, *args: fn(*args)):
        self.link, self.k, self.K, self.method, self.guard = link, k, K, method, guard
        self.active = method.sends
        self.owed: int | None = None  # the step whose message chunk k+1 still owes this chunk

    def handed_on(self, step: int) -> None:
        """Chunk k has handed step ``step``'s output on: take the message of the step before, if it is owed."""
        if not self.active or self.k == self.K - 1:
            return
        self.take()
        self.owed = step

    def take(self) -> None:
        """Receive the message chunk k+1 owes (if any) into the method's state."""
        if self.owed is not None:
            _, _, (grad,) = self.guard(self.link.recv, self.k + 1, GRAD)
            self.method.receive(self.k, None if grad.numel() == 1 else grad)
            self.owed = None

    def send_back(self, step: int, grad: torch.Tensor | None) -> None:
        """Send the gradient of this chunk's input of step ``step`` to chunk k-1."""
        if self.active and self.k:
            self.guard(self.link.send, self.k - 1, TRAIN, step, [NO_MESSAGE if grad is None else grad], GRAD)

    def reset(self) -> None:
        """After a state load: the loaded state holds every message owed so far."""
        self.owed = None


def metric_values(method, k: int, K: int) -> list[float]:
    """The values of chunk k's method metrics of this step, in ``method.metric_names(k, K)`` order (NaN: none yet)."""
    metrics = method.take_metrics()
    return [float(metrics[n]) if n in metrics else math.nan for n in method.metric_names(k, K)]


def metric_record(method, k: int, K: int, values: list[float]) -> dict[str, float] | None:
    """The inverse of :func:`metric_values` on rank 0."""
    record = {n: v for n, v in zip(method.metric_names(k, K), values) if not math.isnan(v)}
    return record or None
