"""Measurements behind ``analysis/bench.py``: one configuration per fresh process.

:func:`measure` trains ``warmup + steps`` steps of a run config through the real Lightning path
(callbacks and TensorBoard logging included, validation and checkpoints off) and reports the median
step time over the last ``steps`` (the time between the starts of consecutive steps: data, logging
and every callback included), tokens/s, the peak bytes saved for backward in one step (per process
in mode=pipeline), the CUDA allocator peak, the peak resident memory of every process, and the
auxiliary heads' share of the forward FLOPs. :func:`measure_bare` times a plain PyTorch loop (no
Lightning) over the same model, optimizer, schedule and data, the reference for framework overhead.

    python -m locallearn.benchmark '{"overrides": ["chunks=2"], "steps": 30, "warmup": 5}'

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

from locallearn.build import quiet_lightning
from locallearn.config import compose_run_config
from locallearn.execution import update
from locallearn.memory import metered
from locallearn.train import build

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


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _aux_flop_share(flops: list[dict]) -> float:
    """Forward FLOPs of the auxiliary heads (every chunk's head but the last) over the whole forward."""
    total = sum(f["trunk"] + f["head"] for f in flops)
    return sum(f["head"] for f in flops[:-1]) / total if total else 0.0


def measure(overrides: list[str], steps: int, warmup: int, threads: int | None = None) -> dict:
    quiet_lightning()
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run_config(out, [*overrides, f"trainer.max_steps={warmup + steps}", *BENCH_OVERRIDES])
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
            "cuda_peak_allocated_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None),
            "peak_rss_bytes": max(rss), "peak_rss_bytes_per_process": rss,
            "aux_head_flop_share": _aux_flop_share(module.flops_per_token or []),
            "threads": threads or torch.get_num_threads(), "device": str(module.device),
        }


def measure_bare(overrides: list[str], steps: int, warmup: int, threads: int | None = None) -> dict:
    """The same model, optimizer, schedule, clipping and batches in a plain loop, without Lightning."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run_config(out, [*overrides, f"trainer.max_steps={warmup + steps}", *BENCH_OVERRIDES])
        run = build(cfg)
    module, device = run.module, torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    net = module.net.to(device).train()
    opt = module.optimizer_factory(module.param_groups())
    sched = module.scheduler_factory(opt, total_steps=warmup + steps) if module.scheduler_factory else None
    run.datamodule.setup("fit")
    batches = iter(run.datamodule.train_dataloader())
    starts, peaks = [], []
    for step in range(warmup + steps):
        starts.append(time.perf_counter())
        batch = next(batches).to(device)
        prepared = module.objective.prepare(batch, module.mask_generator(step, train=True))
        backward_pass = module.backward_pass(prepared)
        if step == 0:
            backward_pass = metered(backward_pass, net.parameters(), peaks.append)
        update(opt, net, range(len(net)), backward_pass, step, module.grad_clip, sched)
        if device.type == "cuda":
            torch.cuda.synchronize()
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


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    fn = measure_bare if args.pop("bare", False) else measure
    print(json.dumps(fn(**args)))
