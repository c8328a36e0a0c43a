"""What a pipeline run cannot do, refused before anything is built, and the device each chunk's process uses."""

import os

import torch
import torch.distributed as dist

from locallearn.errors import ConfigError

# What a pipeline's chunk processes reproduce of Lightning's precision plugins (locallearn/pipeline/worker.py).
PIPELINE_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")


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
    if cfg.get("interlock", 1) > 1:
        raise ConfigError(f"interlock={cfg.interlock} trains the blocks of earlier chunks, which live in other "
                          f"processes in mode=pipeline (it would need their graphs or a backward message); use "
                          f"interlock=1 or mode=sequential.")
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
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PIPELINE_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported with mode=pipeline (its chunk processes "
                          f"run {' or '.join(PIPELINE_PRECISIONS[::2])} themselves, without Lightning's scaler or "
                          f"weight casts); use trainer.precision=bf16-mixed (trainer=gpu) or 32-true.")
    threads = cfg.get("pipeline", {}).get("threads")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"pipeline.threads={threads} must be at least 1 (CPU threads per chunk's process).")
