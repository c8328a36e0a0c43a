"""Measurements behind ``analysis/bench.py``: one configuration per fresh process.

:func:`measure` trains ``warmup + steps`` steps of a run config through the real Lightning path
(callbacks and TensorBoard logging included, validation and checkpoints off) and reports the median
step time over the last ``steps`` (the time between the starts of consecutive steps: data, logging
and every callback included), tokens/s, the peak bytes saved for backward in one step (per process
in mode=pipeline), the CUDA allocator peak, the peak resident memory of every process, and the
auxiliary heads' share of the forward FLOPs. :func:`measure_bare` times a plain PyTorch loop (no
Lightning) over the same model, optimizer, schedule and data, the reference for framework overhead.

    python -m locallearn.measure '{"overrides": ["chunks=2"], "steps": 30, "warmup": 5}'

prints one JSON line; ``analysis/bench.py`` runs it once per configuration, so that peak memory is
the configuration's own.
"""

import json
import resource
import statistics
import sys
import tempfile
import time

import lightning as L
import torch

from locallearn.build import make_method, quiet_lightning
from locallearn.config import compose_run_config, instantiate
from locallearn.model.chunked import make_net
from locallearn.pipeline.worker import autocast
from locallearn.runner import build
from locallearn.training.memory import SavedTensorMeter, metered
from locallearn.training.update import joint_backward, sequential_backward, update

BENCH_OVERRIDES = [
    "++trainer.limit_val_batches=0",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "~callbacks.model_checkpoint",
]


class StepClock(L.Callback):
    """perf_counter at the start of every training step, and once more at the end of training."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())


def threads_override(threads: int | None) -> list[str]:
    """The run-config override that gives the process ``threads`` CPU threads (None: the config's default)."""
    return [f"process.threads={threads}"] if threads else []


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _aux_flop_share(flops: list[dict]) -> float:
    """Forward FLOPs of the auxiliary heads (every chunk's head but the last) over the whole forward."""
    total = sum(f["trunk"] + f["head"] for f in flops)
    return sum(f["head"] for f in flops[:-1]) / total if total else 0.0


def measure(overrides: list[str], steps: int, warmup: int, threads: int | None = None) -> dict:
    quiet_lightning()
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run_config(out, [*overrides, f"trainer.max_steps={warmup + steps}", *BENCH_OVERRIDES,
                                       *threads_override(threads)])
        run = build(cfg)
        clock = StepClock()
        run.trainer.callbacks.append(clock)
        try:
            run.trainer.fit(run.module, datamodule=run.datamodule)
        finally:
            run.module.shutdown()
        module = run.module
        times = [b - a for a, b in zip(clock.starts[warmup:], clock.starts[warmup + 1:])]
        step_s = statistics.median(times)
        tokens = run.datamodule.tokens_per_batch
        per_process = module.process_activation_bytes
        rss = [_rss_bytes()] + module.strategy.worker_rss_bytes()
        return {
            "overrides": overrides, "chunks": len(module.net), "mode": module.mode, "steps": steps,
            "step_ms": 1000 * step_s, "step_ms_mean": 1000 * statistics.mean(times),
            "tokens_per_s": tokens / step_s, "tokens_per_step": tokens,
            "activation_bytes": max(b for b in per_process if b is not None),
            "activation_bytes_per_process": per_process,
            "method_state_bytes": module.method.state_bytes(),  # held between steps (this process's chunks)
            "cuda_peak_allocated_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None),
            "peak_rss_bytes": max(rss), "peak_rss_bytes_per_process": rss,
            "aux_head_flop_share": _aux_flop_share(module.flops_per_token or []),
            "threads": torch.get_num_threads(), "device": str(module.device),
        }


def bare_loop(overrides: list[str], total_steps: int, threads: int | None = None):
    """``(run, step)``: the run's model, optimizer, schedule, clipping and batches, and ``step(i)`` that trains
    step i in a plain loop, without Lightning (returning the peak bytes saved for backward at step 0)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run_config(out, [*overrides, f"trainer.max_steps={total_steps}", *BENCH_OVERRIDES,
                                       *threads_override(threads)])
        run = build(cfg)
    module, device = run.module, torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    net = module.net.to(device).train()
    opt = module.optimizer_factory(module.param_groups())
    sched = module.scheduler_factory(opt, total_steps=total_steps) if module.scheduler_factory else None
    run.datamodule.setup("fit")
    batches = iter(run.datamodule.train_dataloader())

    def step(i: int) -> int | None:
        peaks = []
        batch = next(batches).to(device)
        prepared = module.objective.prepare(batch, module.mask_generator(i, train=True))
        backward_pass = module.backward_pass(prepared)
        if i == int(module.method.sends):  # the first step (with a method, the second: the first has no message)
            backward_pass = metered(backward_pass, net.parameters(), peaks.append)
        with autocast(cfg.trainer.precision, device):  # bf16-mixed as Lightning runs it
            update(opt, net, range(len(net)), backward_pass, i, module.grad_clip, sched)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return peaks[0] if peaks else None

    return run, device, step


def measure_bare(overrides: list[str], steps: int, warmup: int, threads: int | None = None) -> dict:
    """The same model, optimizer, schedule, clipping and batches in a plain loop, without Lightning."""
    run, device, step = bare_loop(overrides, warmup + steps, threads)
    module, net = run.module, run.module.net
    starts, peaks = [], []
    for i in range(warmup + steps):
        starts.append(time.perf_counter())
        peak = step(i)
        if peak is not None:
            peaks.append(peak)
    starts.append(time.perf_counter())
    times = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]
    step_s = statistics.median(times)
    tokens = run.datamodule.batch_size * run.datamodule.block_size
    return {"overrides": overrides, "chunks": len(net), "mode": f"bare {module.mode}", "steps": steps,
            "step_ms": 1000 * step_s, "step_ms_mean": 1000 * statistics.mean(times), "tokens_per_s": tokens / step_s,
            "tokens_per_step": tokens, "activation_bytes": peaks[0], "activation_bytes_per_process": peaks,
            "cuda_peak_allocated_bytes": (torch.cuda.max_memory_allocated() if device.type == "cuda" else None),
            "peak_rss_bytes": _rss_bytes(), "peak_rss_bytes_per_process": [_rss_bytes()],
            "aux_head_flop_share": _aux_flop_share(net.flops_per_token(net.gpt.config.block_size)),
            "threads": torch.get_num_threads(), "device": str(device)}


def measure_interleaved(configs: list[list[str]], steps: int, warmup: int, threads: int | None = None) -> dict:
    """Bare-loop steps of several configurations built in one process and run in turn (one step of each, then the
    next round): their step-time ratios, free of the drift between processes started minutes apart."""
    loops = [bare_loop(overrides, warmup + steps, threads)[2] for overrides in configs]
    times = [[] for _ in configs]
    for i in range(warmup + steps):
        order = list(zip(loops, times))
        for step, t in order if i % 2 else order[::-1]:  # alternate who goes first: no position bias
            start = time.perf_counter()
            step(i)
            if i >= warmup:
                t.append(time.perf_counter() - start)
    ms = [1000 * statistics.median(t) for t in times]
    return {"configs": configs, "mode": "interleaved", "step_ms": ms, "ratio_to_first": [m / ms[0] for m in ms],
            "threads": torch.get_num_threads()}


# Kernels that torch.compile hands to the same libraries as eager (oneDNN/MKL GEMMs, the fused SDPA): time in
# them is out of its reach, so 1 / (their share of a step) bounds what it can gain.
LIBRARY_OPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
               "attention": ("aten::_scaled_dot_product",)}


def profile_ops(overrides: list[str], steps: int, warmup: int, threads: int | None = None) -> dict:
    """Where a bare-loop step's CPU time goes (torch.profiler, self time per op over ``steps`` steps):
    milliseconds per step in GEMMs, in attention, and in everything else."""
    from torch.profiler import ProfilerActivity, profile

    run, _, step = bare_loop(overrides, warmup + steps, threads)
    for i in range(warmup):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(warmup, warmup + steps):
            step(i)
    ms = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = next((k for k, names in LIBRARY_OPS.items() if event.key.startswith(names)), "other")
        ms[kind] += event.self_cpu_time_total / 1000 / steps
    total = sum(ms.values())
    return {"overrides": overrides, "chunks": len(run.module.net), "mode": f"profile {run.module.mode}",
            "ms_per_step": ms, "total_ms": total, "library_share": (ms["matmul"] + ms["attention"]) / total,
            "threads": torch.get_num_threads()}


def measure_blocks(overrides: list[str], steps: int, warmup: int, threads: int | None = None) -> dict:
    """Forward and backward of the run's transformer blocks alone, eager against ``compile=true``'s compiled
    blocks, on one batch of hidden states, alternating in one process: the most ``compile=true`` can gain
    (it compiles nothing else), and how far the compiled blocks' outputs are from eager's."""
    import copy

    run, device, _ = bare_loop(overrides, warmup + steps, threads)
    eager = run.module.net.gpt.blocks
    compiled = copy.deepcopy(eager)
    for block in compiled:
        block.compile()
    cfg = run.module.net.gpt.config
    x = torch.randn(run.datamodule.batch_size, cfg.block_size, cfg.n_embd, device=device)  # (B, T, C)

    def fwd_bwd(blocks) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        h = x
        for block in blocks:
            h = block(h)
        h.square().mean().backward()
        return time.perf_counter() - start, h.detach()

    times = {"eager": [], "compiled": []}
    for i in range(warmup + steps):
        for name, blocks in (("eager", eager), ("compiled", compiled)):
            t, out = fwd_bwd(blocks)
            if i >= warmup:
                times[name].append(t)
    diff = float((fwd_bwd(eager)[1] - fwd_bwd(compiled)[1]).abs().max())
    eager_ms, compiled_ms = (1000 * statistics.median(times[k]) for k in ("eager", "compiled"))
    return {"overrides": overrides, "mode": "blocks only", "eager_ms": eager_ms, "compiled_ms": compiled_ms,
            "speedup": eager_ms / compiled_ms, "max_abs_diff": diff, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    kind = args.pop("kind", "lightning")
    fn = {"bare": measure_bare, "profile": profile_ops, "blocks": measure_blocks, "interleaved": measure_interleaved,
          "lightning": measure}[kind]
    print(json.dumps(fn(**args)))


def step_memory(cfg, vocab_size: int, seed: int = 0) -> dict[str, int]:
    """What one ``mode=sequential`` training step of the run config ``cfg`` holds, on the CPU, deterministically: the
    peak bytes saved for backward (the second step, so that a method's terms are in it) and the bytes its method
    keeps between steps; with a local-to-global switch, the most of a local and a global step. What a run of ``cfg``
    holds in mode=sequential (per chunk's process in mode=pipeline), whatever mode it ran in."""
    torch.manual_seed(seed)
    objective = instantiate(cfg.objective)
    net = make_net(cfg, objective, vocab_size).train()
    method = make_method(cfg)
    T = int(cfg.data.block_size)
    tokens = torch.randint(vocab_size, (2, int(cfg.data.batch_size), T + 1))
    peaks = []
    extra = (lambda k: net.extra[k]) if net.extra is not None else (lambda k: None)  # noqa: E731
    switch = (cfg.get("switch") or {}).get("at") is not None
    for i in range(3 if switch else 2):
        net.local = i < 2  # the third: a global step, after the switch
        prepared = objective.prepare(tokens[i % 2], torch.Generator().manual_seed(i))
        loss_fn = lambda k, h, logits, p=prepared: objective.loss(logits, h, p, extra(k))  # noqa: E731
        backward = sequential_backward if net.local else joint_backward  # as the learner's global phase
        with SavedTensorMeter(net.parameters()) as meter:
            backward(net, prepared.idx, loss_fn, torch.Tensor.backward, [1.0] * len(net),
                     method=method if net.local else None)
        peaks.append(meter.peak)
        net.zero_grad(set_to_none=True)
    peak = max(peaks[1:])
    return {"saved_peak": peak, "held": method.state_bytes() if method is not None else 0}
