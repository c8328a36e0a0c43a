"""Execution strategies: how a training batch becomes per-chunk updates, each over the one chunk update
(:func:`locallearn.training.update.update`).

* ``joint``: one forward through all chunks, one backward of the weighted sum of local losses.
* ``sequential``: forward, backward and free each chunk in turn (the activation-memory saving).
* ``pipeline``: each chunk in its own process, all at once (:mod:`locallearn.pipeline`); each chunk
  makes exactly the updates it makes in ``sequential``.

With the same seed all three make the same updates, with any method that sends downstream information back
(:mod:`locallearn.training.methods`, the ``method`` config group). A new way of running the chunks is one new
:class:`Strategy` and its config file, ``conf/mode/<name>.yaml`` (``mode: <name>`` and a ``strategy`` node with its
``_target_``).
"""

from collections.abc import Callable, Iterable

import torch

from locallearn.training.update import Update, joint_backward, sequential_backward


class Strategy:
    """How a :class:`~locallearn.training.learner.LocalLearner` turns a batch into per-chunk updates (training) and
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
                                                    module.loss_weights, method=module.method),
                              range(len(net)), step)]

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
