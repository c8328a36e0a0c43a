"""The pipeline's transport: ordered messages between the chunks' processes, and what travels in them.

Everything travels down one chain of ordered messages (TRAIN, VAL, VAL_END, STATE, LOAD, STOP), so a
validation or a state request reaches chunk k only after all the training batches before it. Train
results come back to rank 0 on a side channel (tag RESULT); pickled objects (validation sums, chunk
states) on a third (OBJECT); a method's gradient messages go up the chain on a fourth (GRAD).

Processes talk through a gloo process group built from a TCP store (not torch's default group,
which Lightning and torchmetrics would take for data parallelism). Tensors on a GPU are staged
through host memory, or sent device to device over NCCL with ``pipeline.backend=nccl``.
"""

import datetime
import os
import pickle
import socket

import torch
import torch.distributed as dist

from locallearn.model.objectives import Prepared

TRAIN, VAL, VAL_END, STATE, LOAD, STOP = range(6)
CHAIN, RESULT, OBJECT, GRAD = 0, 1, 2, 3  # message tags: the chain, train results to rank 0, pickled objects, a
#                                           method's gradient messages to the chunk before
HEADER = 64  # int64 slots: command, step, number of tensors, then (dtype, ndim, on device, d0, d1, d2) per tensor
SLOTS = 6
MAX_TENSORS = (HEADER - 3) // SLOTS
DTYPES = [torch.float32, torch.int64, torch.bfloat16, torch.float16, torch.bool]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """Ordered point-to-point messages between the pipeline's processes.

    Headers, train results and pickled objects always go through gloo in host memory. Tensors on a GPU
    go through NCCL with ``backend="nccl"`` (device to device), else through gloo via host memory.
    """

    def __init__(self, rank: int, world: int, addr: str, port: int, timeout_s: float = 1800):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # Under torchrun the launcher already serves a store on MASTER_PORT: join it, under our own prefix.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(addr, port, world, rank == 0 and not agent_store, timeout=self.timeout)
        self.store = dist.PrefixStore("locallearn_pipeline/", store)
        self.pg = dist.ProcessGroupGloo(self.store, rank, world, self.timeout)
        self.rank, self.world, self.device = rank, world, torch.device("cpu")
        self.nccl = None
        self._pending: list = []  # sends in flight: (work, tensor kept alive until it completes)
        # Train results to rank 0 and gradient messages to the chunk before are never waited for while training:
        # their receivers take them only between their own steps (or at a state pull), and a chain send waiting
        # behind them could wait for a rank that waits for this rank's validation results (a deadlock from K=4 on
        # for results, from the first validation for messages). Completed ones are dropped as we go.
        self._results: list = []

    def use_device(self, device, backend: str = "gloo"):
        """Where received tensors go; with ``backend="nccl"`` GPU tensors travel device to device."""
        self.device = torch.device(device)
        if backend == "nccl":
            torch.cuda.set_device(self.device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", self.store), self.rank, self.world, options)

    def _send(self, tensors, dst, tag):
        queue = self._results if tag in (RESULT, GRAD) else self._pending
        for t in tensors:
            group = self.nccl if t.is_cuda else self.pg
            queue.append((group.send([t], dst, tag), t))

    def wait_sends(self, keep: int = 0):
        """Wait until at most ``keep`` sends other than train results and gradient messages are still in flight
        (with ``keep=0``, those too)."""
        while len(self._pending) > keep:
            work, _ = self._pending.pop(0)
            work.wait()
        if keep == 0:
            for work, _ in self._results:
                work.wait()
        self._results = [(work, t) for work, t in self._results if not work.is_completed()]

    def send(self, dst: int, cmd: int, step: int = 0, tensors=(), tag: int = CHAIN):
        if len(tensors) > MAX_TENSORS:
            raise ValueError(f"a message holds at most {MAX_TENSORS} tensors, not {len(tensors)}")
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[:3] = torch.tensor([cmd, step, len(tensors)])
        payload = []
        for i, t in enumerate(tensors):
            on_device = self.nccl is not None and t.is_cuda
            t = t.detach().contiguous() if on_device else t.detach().to("cpu").contiguous()
            if t.dim() > 3 or t.dtype not in DTYPES:
                raise ValueError(f"cannot send a {t.dtype} tensor of shape {tuple(t.shape)}")
            at = 3 + SLOTS * i
            header[at:at + 3] = torch.tensor([DTYPES.index(t.dtype), t.dim(), int(on_device)])
            header[at + 3:at + 3 + t.dim()] = torch.tensor(t.shape)
            payload.append(t)
        self.wait_sends(keep=16)  # a bounded number of messages in flight
        self._send([header, *payload], dst, tag)

    def recv(self, src: int, tag: int = CHAIN) -> tuple[int, int, list[torch.Tensor]]:
        header = torch.zeros(HEADER, dtype=torch.int64)
        self.pg.recv([header], src, tag).wait()
        cmd, step, n = header[:3].tolist()
        tensors = []
        for i in range(n):
            at = 3 + SLOTS * i
            code, ndim, on_device = header[at:at + 3].tolist()
            shape = header[at + 3:at + 3 + ndim].tolist()
            t = torch.empty(shape, dtype=DTYPES[code], device=self.device if on_device else "cpu")
            (self.nccl if on_device else self.pg).recv([t], src, tag).wait()
            tensors.append(t)
        return cmd, step, tensors

    def send_object(self, dst: int, obj):
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self._send([torch.tensor([data.numel()], dtype=torch.int64), data], dst, OBJECT)

    def recv_object(self, src: int):
        n = torch.zeros(1, dtype=torch.int64)
        self.pg.recv([n], src, OBJECT).wait()
        data = torch.empty(int(n), dtype=torch.uint8)
        self.pg.recv([data], src, OBJECT).wait()
        return pickle.loads(data.numpy().tobytes())


# -- one chunk's training state, moved between ranks --------------------------------------------------

def chunk_state(net, optimizer, k: int, method) -> dict:
    """Chunk k's parameters, their optimizer state and the method's state for the chunk, on the host."""
    params = net.chunk_parameters(k)
    opt_state = [{n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in optimizer.state.get(p, {}).items()}
                 for p in params]
    return {"params": [p.detach().cpu() for p in params], "opt": opt_state, "method": _moved(method.state(k), "cpu")}


def _moved(obj, device):
    """``obj`` with its tensors on ``device``, except random states (CPU byte tensors wherever the model is)."""
    if isinstance(obj, dict):
        return {key: (value if key == "rng" else _moved(value, device)) for key, value in obj.items()}
    return obj.to(device) if torch.is_tensor(obj) else obj


@torch.no_grad()
def load_chunk_state(net, optimizer, k: int, state: dict, method):
    method.load_state(k, _moved(state.get("method", {}), net.gpt.wte.weight.device))
    for p, value, opt_state in zip(net.chunk_parameters(k), state["params"], state["opt"]):
        p.copy_(value.to(p.device))
        if opt_state:
            optimizer.state[p] = {n: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                  for n, v in opt_state.items()}
        else:
            optimizer.state.pop(p, None)


_ABSENT = torch.empty(0)  # a field of Prepared that is None travels as an empty tensor (fields are never empty)


def prepared_tensors(prepared: Prepared) -> list[torch.Tensor]:
    return [_ABSENT if t is None else t for t in vars(prepared).values()]


def prepared_from(tensors, device) -> Prepared:
    return Prepared(*(None if t.numel() == 0 else t.to(device) for t in tensors))
