"""Activation memory, counted as the bytes autograd saves for backward.

The count is exact and deterministic on any device: a ``saved_tensors_hooks`` pack hook sees every
tensor autograd keeps, and a weak-reference finalizer sees it released (after its backward, or when
its graph is dropped). Storages are counted once however often they are saved; parameters (which
matmuls save too) are not activations and are left out.
"""

import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks


class _Saved:
    """What autograd holds instead of the tensor while the meter watches."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Context manager; ``peak`` is the most bytes held for backward at any one time inside it.

    >>> with SavedTensorMeter(model.parameters()) as meter:
    ...     loss = model(x).sum(); loss.backward()
    >>> meter.peak
    """

    def __init__(self, exclude=()):
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._refs: dict[int, int] = {}  # storage pointer -> number of saves alive
        self._bytes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._excluded:
            return t
        if self._refs.get(ptr, 0) == 0:
            self._bytes[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[ptr] = self._refs.get(ptr, 0) + 1
        saved = _Saved(t)
        weakref.finalize(saved, self._release, ptr)
        return saved

    def _release(self, ptr: int):
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            self.live -= self._bytes.pop(ptr)
            del self._refs[ptr]

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def __enter__(self):
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def metered(fn, params, report):
    """``fn`` (no arguments) wrapped to call ``report(peak)`` with the most bytes it held for backward at once
    (``params`` are not counted)."""
    def run():
        with SavedTensorMeter(params) as meter:
            out = fn()
        report(meter.peak)
        return out
    return run
