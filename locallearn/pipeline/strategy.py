"""``mode=pipeline``: every chunk in its own process (and device), all training at once.

No gradient crosses a chunk boundary, so chunk k+1 needs nothing from chunk k but its forward
output. Rank 0 runs the Lightning trainer and chunk 1 through :class:`PipelineStrategy`; rank k runs
chunk k+1 in :func:`~locallearn.pipeline.worker.worker_loop`. Each rank sends its hand-off on *before*
its backward, so while chunk k+1 trains on batch t, chunk k already trains on batch t+1: every chunk
gets exactly the inputs and makes exactly the updates it makes in ``sequential`` mode, only earlier in
wall time (bit for bit with dropout 0; dropout draws from each process's own RNG).

Rank 0 validates chunk 1 and collects the other chunks' val losses at VAL_END, then pulls every chunk's
parameters and optimizer state (STATE) into its own copy of the model, so checkpoints, summaries and
TensorBoard are those of a one-process run, and a pipeline checkpoint resumes in any mode. Train
losses come back to rank 0 on a side channel, one step late per chunk.
``python run.py mode=pipeline chunks=K`` starts the K-1 worker processes itself; under
``torchrun --nproc_per_node=K`` the ranks are torchrun's.
"""

import logging
import os
import time

import torch
import torch.multiprocessing as mp

from locallearn.errors import PipelineError
from locallearn.pipeline.limits import check_pipeline, worker_devices
from locallearn.pipeline.link import (
    LOAD,
    RESULT,
    STATE,
    STOP,
    TRAIN,
    VAL,
    VAL_END,
    Link,
    chunk_state,
    free_port,
    load_chunk_state,
    prepared_tensors,
)
from locallearn.pipeline.messages import BackwardMessages, metric_record
from locallearn.pipeline.worker import PEER_LOST, run_worker
from locallearn.training.strategies import Strategy
from locallearn.training.update import Update, chunk_backward

log = logging.getLogger(__name__)


class PipelineStrategy(Strategy):
    """Rank 0 of ``mode=pipeline``: trains chunk 1 in this process and drives the other chunks' processes.

    Args: ``threads`` (CPU threads per process; None = cores / chunks), ``backend`` (gloo, or nccl for GPU
    tensors device to device). The workers build their chunk from the run config and the data's vocabulary size.
    """

    name = "pipeline"
    check = staticmethod(check_pipeline)

    def __init__(self, threads: int | None = None, backend: str = "gloo"):
        self.threads, self.backend = threads, backend
        self.module = None  # the LightningModule driving the pipeline (from setup on)
        self.link: Link | None = None
        self.messages: BackwardMessages | None = None  # a method's gradient messages from chunk 2 (with the link)
        self.procs: list = []
        self._threads_before: int | None = None
        self.next_result: list[int] = []  # per chunk: the next train step whose result rank 0 expects
        self.worker_activation_bytes: list[int | None] = []
        self.worker_rss: list[int | None] = []
        self._loaded = False
        self._pulled_at: int | None = None  # the step of the last state pull

    # -- processes ----------------------------------------------------------------------------------
    def setup(self, module):
        self.module = module
        K = len(module.net)
        self.threads = self.threads or max(1, torch.get_num_threads() // K)  # this process's share (process.threads)
        self.next_result = [0] * K
        self.worker_activation_bytes, self.worker_rss = [None] * K, [None] * K
        for metric in module.metrics.loss:
            metric.sync_on_compute = False  # chunks' val losses arrive by message, not by a collective
        if self.link is None:
            self._start()

    def _start(self):
        module = self.module
        K = len(module.net)
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        config = module.hparams.config
        devices = worker_devices(K, str(config.get("trainer", {}).get("accelerator", "auto")))
        vocab_size = module.net.gpt.config.vocab_size - module.objective.extra_tokens

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
        self.messages = BackwardMessages(self.link, 0, K, module.method, self._guard)
        if "WORLD_SIZE" in os.environ:  # the torchrun workers wait for their config
            for k in range(1, K):
                self.link.send_object(k, setup(k))
        self.link.use_device(module.device, self.backend)
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
        step = self.module.global_step
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
        ckpt = next((cb.last_model_path for cb in self.module.trainer.checkpoint_callbacks if cb.last_model_path), None)
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
                self.messages.take()  # leave no send of chunk 2 unmatched
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
        net, opt = self.module.net, self.module.optimizers().optimizer
        self._guard(self.link.send, 1, LOAD, self.module.global_step)
        for k in range(1, len(net)):
            self._guard(self.link.send_object, k, chunk_state(net, opt, k, self.module.method))
        self._guard(self.link.wait_sends)
        self.messages.reset()
        self._loaded = True

    def _pull_states(self):
        """Copy every worker's chunk (parameters, optimizer state) into this process's model."""
        net, opt = self.module.net, self.module.optimizers().optimizer
        self._guard(self.link.send, 1, STATE)
        self.messages.take()  # the message chunk 2 still owes belongs in the checkpoint
        for k in range(1, len(net)):
            state = self._guard(self.link.recv_object, k)
            load_chunk_state(net, opt, k, state, self.module.method)
            self.worker_activation_bytes[k] = state["activation_bytes"]
            self.worker_rss[k] = state["max_rss_bytes"]
        self._pulled_at = self.module.global_step

    # -- the strategy's hooks -------------------------------------------------------------------------
    def on_validation_start(self, module):
        if not self._loaded:
            self._push_states()

    def on_train_start(self, module):
        self._push_states()  # after Lightning restored the optimizer (and the step) from a checkpoint
        self.next_result = [module.global_step] * len(module.net)

    def on_train_end(self, module):
        if len(module.net) > 1 and self._pulled_at != module.global_step:  # a run that ends without validating
            self._record(self._collect(lambda k: module.global_step - 1))
            self._pull_states()

    def teardown(self, module, graceful: bool = True):
        if graceful:
            self._stop_workers()
        elif self.procs or self.link is not None:
            self._stop_workers(graceful=False)

    # -- training -----------------------------------------------------------------------------------
    def train_step(self, module, prepared, loss_fn, step: int) -> list[Update]:
        net = module.net

        def handed_on(out):  # hand on first: chunk 2 starts while chunk 1 runs its backward
            if len(net) > 1:
                self._guard(self.link.send, 1, TRAIN, step, [out[net.plan[1].start], *prepared_tensors(prepared)])
                self.messages.handed_on(step)  # and the message of the step before comes in

        def backward_pass():
            _, loss, _ = chunk_backward(net, 0, prepared.idx, loss_fn, module.manual_backward, module.loss_weights[0],
                                        module.method, handed_on)
            return [loss]

        first = module.update(backward_pass, [0], step)
        # Rank k works k steps behind rank 0; taking its results one step later still keeps rank 0 from waiting.
        return [first, *self._collect(lambda k: step - k - 1)]

    def _collect(self, through) -> list[Update]:
        """Receive the train results of rank k (chunk k+1) for every step up to ``through(k)``."""
        updates = []
        for k in range(1, len(self.module.net)):
            while self.next_result[k] <= min(through(k), self.module.trainer.max_steps - 1):
                _, s, (values,) = self._guard(self.link.recv, k, RESULT)
                loss, lr, norm, momentum, *metrics = values.tolist()
                extra = metric_record(self.module.method, k, len(self.module.net), metrics)
                updates.append(Update(s, [k], [torch.tensor(loss)], [norm], [lr], [momentum], extra=extra))
                self.next_result[k] = s + 1
        return updates

    def _record(self, updates: list[Update]):
        for u in updates:
            self.module.record_update(u)

    # -- validation ---------------------------------------------------------------------------------
    def validation_outputs(self, module, prepared):
        net = module.net
        out, h, logits = net.forward_chunk(0, prepared.idx)
        if len(net) > 1:
            self._guard(self.link.send, 1, VAL, 0, [out[net.plan[1].start], *prepared_tensors(prepared)])
        yield 0, h, logits

    def end_validation(self, module):
        K = len(module.net)
        if K == 1:
            return
        self._guard(self.link.send, 1, VAL_END)
        for k in range(1, K):
            total, weight, (answer_loss, correct, count) = self._guard(self.link.recv_object, k)
            if weight:
                module.metrics.add_loss(k, torch.tensor(total / weight), weight)
            module.metrics.add_answers(k, torch.tensor(answer_loss), torch.tensor(correct), count)
        if not module.trainer.sanity_checking:
            self._record(self._collect(lambda k: module.global_step - 1))  # every chunk has finished every step
            self._pull_states()  # so that the checkpoint saved next holds every chunk

    def process_activation_bytes(self, module) -> list[int | None]:
        """Peak bytes saved for backward in one step, per chunk's process."""
        return [module.activation_bytes] + self.worker_activation_bytes[1:]

    def worker_rss_bytes(self) -> list[int]:
        return [r for r in self.worker_rss[1:] if r]
