"""What a training process sets about itself before it builds anything (``process.*`` in conf/config.yaml).

**Threads.** Torch starts as many CPU threads as the machine has cores, in every process. Two runs side by side
then fight over the cores (OpenMP threads spin while they wait), and a tiny run can take 30x longer. Each process
therefore sets its thread count from the cores it is given: the cores of its CPU affinity (what ``taskset``, a
container or a SLURM allocation gives it), divided by the jobs a local parallel launcher runs at once
(``hydra/launcher=joblib``: its ``n_jobs``). ``OMP_NUM_THREADS``, when set, wins over that default
(``process.threads=null``); a number in ``process.threads`` wins over both.

**Memory given back.** glibc's allocator raises its mmap threshold each time a large block is freed, so after the
first step the tensors of a chunk's forward pass live on the heap, and the heap keeps what they leave behind. Peak
resident memory then stays near the most any step ever held, not what one chunk needs, and local learning's
activation saving hardly shows in the process's memory (docs/benchmarks.md measures both). A fixed threshold of
1 MiB (``mallopt(M_MMAP_THRESHOLD)``) maps every large tensor on its own and unmaps it when it is freed.
"""

import ctypes
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h); setting it also turns the dynamic threshold off
MMAP_THRESHOLD = 1 << 20  # bytes: activations are far larger, Python's small objects far smaller


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def parallel_jobs() -> int:
    """How many jobs of this sweep run at once on this machine: the joblib launcher's ``n_jobs`` (negative counts
    back from the cores, as joblib does); 1 for every other launcher, or outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n = int(launcher.get("n_jobs") or 1)
    return max(1, n if n > 0 else available_cores() + 1 + n)


def thread_count(threads: int | None) -> int:
    """``process.threads``: a number, or None (``OMP_NUM_THREADS`` if set, else this process's share of the
    cores)."""
    if threads is not None:
        return int(threads)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, available_cores() // parallel_jobs())


@functools.cache  # a setting of the whole process: once is enough, however many runs it builds
def release_memory() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (see the module); False where the C library is not
    glibc (macOS, musl) and nothing was changed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process: no search for it
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def setup_process(cfg) -> dict:
    """Apply ``cfg.process`` to this process; return what was set (the run log says it)."""
    settings = cfg.get("process") or {}
    threads = thread_count(settings.get("threads"))
    torch.set_num_threads(threads)
    released = bool(settings.get("release_memory", True)) and release_memory()
    log.info("process: %d CPU thread(s) of %d core(s)%s", threads, available_cores(),
             ", large tensors unmapped when freed" if released else "")
    return {"threads": threads, "release_memory": released}
