"""Data parallelism for chunked models: :class:`ChunkedDDPStrategy` (``trainer=ddp``).

Lightning's own DDP wraps the model in ``DistributedDataParallel``, which averages gradients during
each backward pass and expects exactly one backward per step. ``mode=sequential`` runs one backward
per chunk, so this strategy keeps Lightning's processes, samplers and collectives but not the wrapper:
the module averages every gradient over the processes once per step, after all its backward passes
and before clipping (:func:`average_gradients`). Every mode, and the local-to-global switch, then sees
the gradients of the combined batch.
"""

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.ddp import _sync_module_states


class ChunkedDDPStrategy(DDPStrategy):
    """DDP without the DistributedDataParallel wrapper; the LightningModule averages gradients itself."""

    strategy_name = "chunked_ddp"

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)  # what the wrapper would do at the start: rank 0's weights everywhere

    def teardown(self) -> None:
        # Every rank waits for the others, then closes the process group before its process exits: a
        # rank that exits with gloo's threads still running can abort ("terminate called without an
        # active exception").
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        super().teardown()


@torch.no_grad()
def average_gradients(params) -> None:
    """Average the gradients of ``params`` over all processes, in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
