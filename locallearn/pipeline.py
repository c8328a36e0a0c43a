"""``mode=pipeline``: every chunk in its own process (and device), all training at once.

No gradient crosses a chunk boundary, so chunk k+1 needs nothing from chunk k but its forward
output. Rank 0 runs the Lightning trainer and chunk 1; rank k runs chunk k+1 in :func:`worker_loop`.
For every training batch, each rank receives the hand-off (and the batch's targets) from the rank
before it, runs its chunk forward, sends its own hand-off on *before* its backward, then updates its
chunk. So while chunk k+1 trains on batch t, chunk k already trains on batch t+1: every chunk gets
exactly the inputs and makes exactly the updates it makes in ``sequential`` mode, only earlier in
wall time (bit for bit with dropout 0; dropout draws from each process's own RNG).

Everything travels down one chain of ordered messages (TRAIN, VAL, VAL_END, STATE, LOAD, STOP), so a
validation or a state request reaches chunk k only after all the training batches before it. Rank 0
validates chunk 1 and collects the other chunks' val losses at VAL_END, then pulls every chunk's
parameters and optimizer state (STATE) into its own copy of the model, so checkpoints, summaries and
TensorBoard are those of a one-process run, and a pipeline checkpoint resumes in any mode. Train
losses come back to rank 0 on a side channel, one step late per chunk.

Processes talk through a gloo process group built from a TCP store (not torch's default group,
which Lightning and torchmetrics would take for data parallelism). Tensors on a GPU are staged
through host memory, or sent device to device over NCCL with ``pipeline.backend=nccl``.
``python run.py mode=pipeline chunks=K`` starts the K-1 worker processes itself; under
``torchrun --nproc_per_node=K`` the ranks are torchrun's.
"""

import datetime
import logging
import os
import pickle
import resource
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from locallearn.errors import ConfigError, PipelineError
from locallearn.memory import SavedTensorMeter
from locallearn.module import LocalLearner
from locallearn.objectives import IGNORE, Prepared, answer_scores

log = logging.getLogger(__name__)

TRAIN, VAL, VAL_END, STATE, LOAD, STOP = range(6)
CHAIN, RESULT, OBJECT = 0, 1, 2  # message tags: the chain, train results to rank 0, pickled objects
HEADER = 64  # int64 slots: command, step, number of tensors, then (dtype, ndim, on device, d0, d1, d2) per tensor
SLOTS = 6
MAX_TENSORS = (HEADER - 3) // SLOTS
DTYPES = [torch.float32, torch.int64, torch.bfloat16, torch.float16, torch.bool]
PEER_LOST = 3  # exit code of a worker that stops because another process died


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
        # Train results to rank 0 are never waited for while training: rank 0 receives them only between its
        # own steps, and a chain send waiting behind them could wait for a rank 0 that waits for this rank's
        # validation results (a deadlock from K=4 on). They are tiny; completed ones are dropped as we go.
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
        queue = self._results if tag == RESULT else self._pending
        for t in tensors:
            group = self.nccl if t.is_cuda else self.pg
            queue.append((group.send([t], dst, tag), t))

    def wait_sends(self, keep: int = 0):
        """Wait until at most ``keep`` sends other than train results are still in flight (with ``keep=0``,
        train results too)."""
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

def chunk_state(net, optimizer, k: int) -> dict:
    """Chunk k's parameters and their optimizer state, on the host."""
    params = net.chunk_parameters(k)
    opt_state = [{n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in optimizer.state.get(p, {}).items()}
                 for p in params]
    return {"params": [p.detach().cpu() for p in params], "opt": opt_state}


@torch.no_grad()
def load_chunk_state(net, optimizer, k: int, state: dict):
    for p, value, opt_state in zip(net.chunk_parameters(k), state["params"], state["opt"]):
        p.copy_(value.to(p.device))
        if opt_state:
            optimizer.state[p] = {n: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                  for n, v in opt_state.items()}
        else:
            optimizer.state.pop(p, None)


_ABSENT = torch.empty(0)  # a field of Prepared that is None travels as an empty tensor (fields are never empty)


def _prepared_tensors(prepared: Prepared) -> list[torch.Tensor]:
    return [_ABSENT if t is None else t for t in vars(prepared).values()]


def _prepared_from(tensors, device) -> Prepared:
    return Prepared(*(None if t.numel() == 0 else t.to(device) for t in tensors))


# -- workers ------------------------------------------------------------------------------------------

class _Chunk:
    """What a worker holds: chunk k of the model, its optimizer and schedule, and its loss."""

    def __init__(self, module: LocalLearner, k: int, max_steps: int, device):
        self.module, self.k, self.device = module, k, device
        self.net = module.net.to(device)
        self.optimizer = module.optimizer_factory([g for g in module.param_groups() if g["chunk"] == k])
        self.max_steps = max_steps
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # before any schedule touches them
        self.scheduler = self._schedule(0)
        self.weight = module.loss_weights[k]
        self.activation_bytes = None
        self.val_sum = self.val_weight = 0.0
        self.answers = [0.0, 0.0, 0]  # summed answer loss, correct answers, answers (tasks only)

    def _schedule(self, step: int):
        if self.module.scheduler_factory is None:
            return None
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):  # as at the start of a run
            g["lr"] = lr
        scheduler = self.module.scheduler_factory(self.optimizer, total_steps=self.max_steps)
        for _ in range(step):  # schedules are functions of the step: replay them to where the run is
            scheduler.step()
        return scheduler

    def train(self, handoff, prepared: Prepared, forward):
        self.net.train()
        meter = SavedTensorMeter(self.net.parameters()) if self.activation_bytes is None else None
        if meter is not None:
            meter.__enter__()
        out, h, logits = self.net.forward_chunk(self.k, handoff)
        forward(out)  # the next chunk can start now
        loss = self.module._loss(self.k, h, logits, prepared)
        self.optimizer.zero_grad(set_to_none=True)
        if self.weight:
            (loss if self.weight == 1 else self.weight * loss).backward()
        if meter is not None:
            meter.__exit__(None, None, None)
            self.activation_bytes = meter.peak
        norm = self.module.clip_chunk(self.k)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach()), lr, float(norm)

    @torch.no_grad()
    def validate(self, handoff, prepared: Prepared, forward):
        self.net.eval()
        out, h, logits = self.net.forward_chunk(self.k, handoff)
        forward(out)
        weight = float((prepared.targets != IGNORE).sum())
        self.val_sum += float(self.module._loss(self.k, h, logits, prepared)) * weight
        self.val_weight += weight
        if prepared.answer is not None:
            loss_sum, correct, count = answer_scores(logits, prepared)
            loss_total, correct_total, n = self.answers
            self.answers = [loss_total + float(loss_sum), correct_total + float(correct), n + count]


def worker_loop(link: Link, module: LocalLearner, max_steps: int, device) -> None:
    """Run chunk ``link.rank`` (from 0) until STOP: the body of every rank but 0."""
    k, K = link.rank, link.world
    chunk = _Chunk(module, k, max_steps, device)
    plan = module.net.plan
    last = k == K - 1

    def pass_on(cmd, step, tensors):
        """What hands this chunk's output (and the batch's targets) to the next chunk."""
        def send(out):
            if not last:
                link.send(k + 1, cmd, step, [out[plan[k + 1].start], *tensors[1:]])
        return send

    while True:
        cmd, step, tensors = link.recv(k - 1)
        if cmd in (TRAIN, VAL):
            handoff, prepared = {plan[k].start: tensors[0].to(device)}, _prepared_from(tensors[1:], device)
        if cmd == TRAIN:
            loss, lr, norm = chunk.train(handoff, prepared, pass_on(TRAIN, step, tensors))
            link.send(0, TRAIN, step, [torch.tensor([loss, lr, norm], dtype=torch.float32)], tag=RESULT)
        elif cmd == VAL:
            chunk.validate(handoff, prepared, pass_on(VAL, 0, tensors))
        elif cmd == VAL_END:
            if not last:
                link.send(k + 1, VAL_END)
            link.send_object(0, (chunk.val_sum, chunk.val_weight, chunk.answers))
            chunk.val_sum = chunk.val_weight = 0.0
            chunk.answers = [0.0, 0.0, 0]
        elif cmd == STATE:
            if not last:
                link.send(k + 1, STATE)
            state = chunk_state(chunk.net, chunk.optimizer, k)
            state["activation_bytes"] = chunk.activation_bytes
            state["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            link.send_object(0, state)
        elif cmd == LOAD:
            if not last:
                link.send(k + 1, LOAD, step)
            load_chunk_state(chunk.net, chunk.optimizer, k, link.recv_object(0))
            chunk.scheduler = chunk._schedule(step)
        elif cmd == STOP:
            if not last:
                link.send(k + 1, STOP)
            link.wait_sends()
            return


def serve(link: Link, cfg_dict: dict, vocab_size: int, device: str, threads: int, backend: str) -> None:
    """Build chunk ``link.rank``'s module from the run config and serve it until STOP."""
    from omegaconf import OmegaConf

    from locallearn.train import instantiate, make_module, make_net, quiet_lightning

    link.use_device(device, backend)
    torch.set_num_threads(threads)
    quiet_lightning()
    cfg = OmegaConf.create(cfg_dict)
    objective = instantiate(cfg.objective)
    torch.manual_seed(cfg.seed)
    net = make_net(cfg, objective, vocab_size)
    worker_loop(link, make_module(cfg, net, objective), int(cfg.trainer.max_steps), torch.device(device))


def run_worker(rank: int, world: int, addr: str, port: int, *setup) -> None:
    """Entry point of a self-spawned worker process; ``setup`` is :func:`serve`'s arguments after the link."""
    link = None
    try:
        link = Link(rank, world, addr, port)
        serve(link, *setup)
    except Exception as e:  # noqa: BLE001 - a worker reports any failure to rank 0 and exits
        lost = isinstance(e, RuntimeError) and ("Connection closed" in str(e) or "Connection reset" in str(e))
        if link is not None and not lost:
            try:
                link.store.set(f"error{rank}", f"{type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                pass
        if not lost:
            traceback.print_exc()
        sys.stdout.flush()
        os._exit(PEER_LOST if lost else 1)


# -- rank 0 -------------------------------------------------------------------------------------------

def worker_devices(K: int, accelerator: str) -> list[str]:
    """One device per chunk: cuda:k when training on GPUs (one GPU per chunk is required), else the CPU."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not cuda:
        return ["cpu"] * K
    n = torch.cuda.device_count()
    if n < K:
        raise ConfigError(f"mode=pipeline puts each of the chunks={K} chunks on its own GPU but {n} "
                          f"{'is' if n == 1 else 'are'} visible; use chunks<={n}, more GPUs, or trainer=cpu.")
    return [f"cuda:{k}" for k in range(K)]


def check_pipeline(cfg) -> None:
    """Refuse what cannot run as a pipeline, before any work starts."""
    K = int(cfg.chunks)
    if cfg.get("overlap", 0):
        raise ConfigError(f"overlap={cfg.overlap} trains blocks of the previous chunk, which live in another process "
                          f"in mode=pipeline; use overlap=0 or mode=sequential.")
    if cfg.get("switch", {}).get("at") is not None:
        raise ConfigError(f"switch.at={cfg.switch.at} needs gradients across chunks after the switch, which "
                          f"mode=pipeline never sends; use mode=sequential for local-to-global runs.")
    if cfg.optim.get("hypergrad_lr") is not None:
        raise ConfigError(f"optim.hypergrad_lr={cfg.optim.hypergrad_lr} is not supported with mode=pipeline; "
                          f"use mode=sequential, or drop it.")
    if str(cfg.trainer.get("devices", 1)) not in ("1", "auto") or cfg.trainer.get("num_nodes", 1) != 1:
        raise ConfigError(f"mode=pipeline runs one process per chunk itself; trainer.devices="
                          f"{cfg.trainer.devices} asks Lightning for data parallelism too; use trainer.devices=1.")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != K:
        raise ConfigError(f"mode=pipeline needs one process per chunk, but WORLD_SIZE={world} with chunks={K}; "
                          f"launch torchrun --nproc_per_node={K} (or run python run.py without torchrun).")
    devices = worker_devices(K, str(cfg.trainer.get("accelerator", "auto")))
    backend = cfg.get("pipeline", {}).get("backend", "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"pipeline.backend={backend} must be gloo or nccl.")
    if backend == "nccl" and (devices[0] == "cpu" or not dist.is_nccl_available()):
        raise ConfigError("pipeline.backend=nccl moves tensors between GPUs, but this run is on the CPU or this "
                          "torch has no NCCL; use pipeline.backend=gloo.")
    threads = cfg.get("pipeline", {}).get("threads")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"pipeline.threads={threads} must be at least 1 (CPU threads per chunk's process).")


class PipelineLearner(LocalLearner):
    """The :class:`LocalLearner` of rank 0 in ``mode=pipeline``: trains chunk 1 and drives the others.

    Args (besides LocalLearner's): ``threads`` (CPU threads per process; None = cores / chunks),
    ``backend`` (gloo, or nccl for GPU tensors device to device). The workers build their chunk from
    the run config (``config``) and the data's vocabulary size.
    """

    def __init__(self, *args, threads: int | None = None, backend: str = "gloo", **kwargs):
        super().__init__(*args, **kwargs)
        K = len(self.net)
        self.threads = threads or max(1, (os.cpu_count() or 1) // K)
        self.backend = backend
        self.link: Link | None = None
        self.procs: list = []
        self._threads_before: int | None = None
        self.next_result = [0] * K  # per chunk: the next train step whose result rank 0 expects
        self.no_target_steps: set[int] = set()  # steps whose batch had nothing to score (no loss to record)
        self.worker_activation_bytes: list[int | None] = [None] * K
        self.worker_rss: list[int | None] = [None] * K
        self._loaded = False
        self._pulled_at: int | None = None  # the step of the last state pull
        for metric in self.val_loss:
            metric.sync_on_compute = False  # chunks' val losses arrive by message, not by a collective

    # -- processes ----------------------------------------------------------------------------------
    def _start(self):
        K = len(self.net)
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        config = self.hparams.config
        devices = worker_devices(K, str(config.get("trainer", {}).get("accelerator", "auto")))
        vocab_size = self.net.gpt.config.vocab_size - self.objective.extra_tokens

        def setup(k):  # what worker k needs to build its chunk
            return config, vocab_size, devices[k], self.threads, self.backend

        if "WORLD_SIZE" in os.environ:  # torchrun started the other ranks
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:
            addr, port = "127.0.0.1", free_port()
            ctx = mp.get_context("spawn")
            for k in range(1, K):
                p = ctx.Process(target=run_worker, args=(k, K, addr, port, *setup(k)), daemon=True)
                p.start()
                self.procs.append(p)
        self.link = Link(0, K, addr, port)
        if "WORLD_SIZE" in os.environ:  # the torchrun workers wait for their config
            for k in range(1, K):
                self.link.send_object(k, setup(k))
        self.link.use_device(self.device, self.backend)
        for k, p in enumerate(self.procs, start=1):
            log.info("pipeline: chunk %d runs in process %d (rank %d, %s, CPU threads: %d)", k + 1, p.pid, k,
                     devices[k], self.threads)

    def _guard(self, fn, *args):
        """Run a communication; if a worker died, stop the others and raise one line naming it."""
        try:
            return fn(*args)
        except RuntimeError as e:
            raise self._worker_died(e) from None

    def _worker_died(self, error) -> PipelineError:
        step = self.global_step
        culprit = None
        for _ in range(50):  # the process that died first may still be exiting
            culprit = next(((k, p) for k, p in enumerate(self.procs, start=1)
                            if p.exitcode is not None and p.exitcode not in (0, PEER_LOST)), None)
            if culprit:
                break
            time.sleep(0.1)
        reason = ""
        if culprit is not None:
            try:  # a worker that failed with an exception left its message in the store
                if self.link.store.check([f"error{culprit[0]}"]):
                    reason = f" ({self.link.store.get(f'error{culprit[0]}').decode()})"
            except Exception:  # noqa: BLE001 - the store may be gone with the process
                pass
        self._stop_workers(graceful=False)
        ckpt = next((cb.last_model_path for cb in self.trainer.checkpoint_callbacks if cb.last_model_path), None)
        kept = f"; the last checkpoint, {ckpt}, is intact" if ckpt else ""
        if culprit is None:
            return PipelineError(f"the pipeline lost a worker process at step {step} ({str(error).splitlines()[0]}); "
                                 f"the other processes were stopped{kept}.")
        k, p = culprit
        how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with code {p.exitcode}"
        return PipelineError(f"chunk {k + 1}'s process (rank {k}, pid {p.pid}) {how}{reason} at or after step "
                             f"{step}; the other processes were stopped{kept}.")

    def _stop_workers(self, graceful: bool = True):
        if graceful and self.link is not None:
            try:
                self.link.send(1, STOP)
                self.link.wait_sends()
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(timeout=10 if graceful else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.procs = []
        self.link = None  # drop the process group and the store (their threads and port) with the workers
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)

    def _push_states(self):
        """Give every worker its chunk's parameters and optimizer state (start, and after a resume)."""
        opt = self.optimizers().optimizer
        self._guard(self.link.send, 1, LOAD, self.global_step)
        for k in range(1, len(self.net)):
            self._guard(self.link.send_object, k, chunk_state(self.net, opt, k))
        self._guard(self.link.wait_sends)
        self._loaded = True

    def _pull_states(self):
        """Copy every worker's chunk (parameters, optimizer state) into this process's model."""
        opt = self.optimizers().optimizer
        self._guard(self.link.send, 1, STATE)
        for k in range(1, len(self.net)):
            state = self._guard(self.link.recv_object, k)
            load_chunk_state(self.net, opt, k, state)
            self.worker_activation_bytes[k] = state["activation_bytes"]
            self.worker_rss[k] = state["max_rss_bytes"]
        self._pulled_at = self.global_step

    # -- Lightning hooks ----------------------------------------------------------------------------
    def on_fit_start(self):
        super().on_fit_start()
        if self.link is None:
            self._start()

    def on_validation_start(self):
        if not self._loaded:
            self._push_states()

    def on_train_start(self):
        super().on_train_start()
        self._push_states()  # after Lightning restored the optimizer (and the step) from a checkpoint
        self.next_result = [self.global_step] * len(self.net)

    def on_train_end(self):
        super().on_train_end()
        if len(self.net) > 1 and self._pulled_at != self.global_step:  # a run that ends without validating
            self._collect(lambda k: self.global_step - 1)
            self._pull_states()

    def on_fit_end(self):
        self._stop_workers()

    def shutdown(self):
        """Stop the workers if they still run (``train`` calls it when fit ends, however it ends)."""
        if self.procs or self.link is not None:
            self._stop_workers(graceful=False)

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        step = self.global_step
        prepared = self.objective.prepare(batch, self._generator(step, train=True))
        self._batch_tokens = prepared.idx.numel()
        if not (prepared.targets != IGNORE).any():  # no loss this step (span masking in short windows)
            self.no_target_steps.add(step)
        opt.zero_grad(set_to_none=True)
        meter = SavedTensorMeter(self.net.parameters()) if self._measure_next else None
        if meter is not None:
            meter.__enter__()
        out, h, logits = self.net.forward_chunk(0, prepared.idx)
        if len(self.net) > 1:  # hand on first: chunk 2 starts while chunk 1 runs its backward
            self._guard(self.link.send, 1, TRAIN, step, [out[self.net.plan[1].start], *_prepared_tensors(prepared)])
        loss = self._loss(0, h, logits, prepared)
        if self.loss_weights[0]:
            self.manual_backward(loss if self.loss_weights[0] == 1 else self.loss_weights[0] * loss)
        if meter is not None:
            meter.__exit__(None, None, None)
            self.activation_bytes, self._measure_next = meter.peak, False
        norm = self.clip_chunk(0)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        if self.lr_schedulers() is not None:
            self.lr_schedulers().step()
        self._record(0, step, float(loss.detach()), lr, float(norm))
        # Rank k works k steps behind rank 0; taking its results one step later still keeps rank 0 from waiting.
        self._collect(lambda k: step - k - 1)
        return {"losses": [loss.detach()], "lrs": [lr]}

    def _collect(self, through):
        """Receive the train results of rank k (chunk k+1) for every step up to ``through(k)``."""
        for k in range(1, len(self.net)):
            while self.next_result[k] <= min(through(k), self.trainer.max_steps - 1):
                _, s, (values,) = self._guard(self.link.recv, k, RESULT)
                loss, lr, norm = values.tolist()
                self._record(k, s, loss, lr, norm)
                self.next_result[k] = s + 1

    def _record(self, k: int, step: int, loss: float, lr: float, norm: float):
        scored = step not in self.no_target_steps  # else the loss is a placeholder 0: neither recorded nor logged
        if scored:
            self.train_records.append((k + 1, step, loss, lr))
        if self._logs_at(step):
            loss_tag = {f"train/loss/chunk{k + 1}": loss} if scored else {}
            self.log_train({**loss_tag, f"train/lr/chunk{k + 1}": lr, f"train/grad_norm/chunk{k + 1}": norm}, step)

    # -- validation ---------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        prepared = self.objective.prepare(batch, self._generator(batch_idx, train=False))
        out, h, logits = self.net.forward_chunk(0, prepared.idx)
        if len(self.net) > 1:
            self._guard(self.link.send, 1, VAL, 0, [out[self.net.plan[1].start], *_prepared_tensors(prepared)])
        weight = int((prepared.targets != IGNORE).sum())
        if weight:  # a batch with nothing to score stays out of the mean
            self.val_loss[0].update(self._loss(0, h, logits, prepared), weight=weight)
        if prepared.answer is not None:
            self.update_answers(0, *answer_scores(logits, prepared))

    def on_validation_epoch_end(self):
        K = len(self.net)
        if K > 1:
            self._guard(self.link.send, 1, VAL_END)
            for k in range(1, K):
                total, weight, (answer_loss, correct, count) = self._guard(self.link.recv_object, k)
                if weight:
                    self.val_loss[k].update(torch.tensor(total / weight), weight=weight)
                self.update_answers(k, torch.tensor(answer_loss), torch.tensor(correct), count)
            if not self.trainer.sanity_checking:
                self._collect(lambda k: self.global_step - 1)  # every chunk has finished every step by now
                self._pull_states()  # so that the checkpoint saved next holds every chunk
        super().on_validation_epoch_end()

    @property
    def process_activation_bytes(self) -> list[int | None]:
        """Peak bytes saved for backward in one step, per chunk's process."""
        return [self.activation_bytes] + self.worker_activation_bytes[1:]


def worker_from_env() -> None:
    """A torchrun rank > 0 of a pipeline run: wait for rank 0's config and serve one chunk."""
    link = Link(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]))
    serve(link, *link.recv_object(0))
