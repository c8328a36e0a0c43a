"""Shared fixtures: compose the real Hydra config (conf/) with tiny overrides, as run.py would."""

import os
from pathlib import Path

# One thread for the test process and every process it starts (unless the caller chose): the tests' models are
# tiny, and two threads per process on two shared cores made the suite up to 2.7x slower (test_readme: 272 s
# against 102 s) for OpenMP's synchronization, not for any work.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import locallearn  # noqa: F401  (registers the ${ll.*} resolvers)
from locallearn.config import PROJECT_ROOT, compose_run_config

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CONF_DIR = str(PROJECT_ROOT / "conf")
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Small enough for a CPU test in a second or two, big enough that chunks=1,2,4 all make sense.
TINY = [
    "data=synthetic",  # the default run trains 4 chunks on a task (data=induction); tests keep the former defaults
    "chunks=2",
    "model=tiny",
    "data.n_train_tokens=20000",
    "data.n_val_tokens=4000",
    "data.batch_size=8",
    "data.val_windows=16",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "schedule.warmup_steps=2",
]


def tiny_overrides(overrides) -> list[str]:
    """TINY, less the keys ``overrides`` set themselves, less the synthetic corpus sizes when another data set is
    chosen, and less the warmup when a schedule without one is."""
    overrides = [o.lstrip("+~") for o in overrides]
    own = {o.split("=", 1)[0] for o in overrides}
    if own & {"variant", "experiment"}:  # these set chunks (and experiments data) themselves
        own |= {"chunks", "data"} if "experiment" in own else {"chunks"}
    other_data = "data" in own and "data=synthetic" not in overrides
    no_warmup = any(o.startswith("schedule=") and o != "schedule=cosine" for o in overrides)
    return [o for o in TINY if o.split("=", 1)[0] not in own and not (other_data and o.startswith("data.n_"))
            and not (no_warmup and o.startswith("schedule.warmup_steps"))]


def tiny_args(*args: str) -> list[str]:
    """A run.py command line's arguments made tiny: ``tiny_overrides(args)`` first, so that ``args`` win."""
    return [*tiny_overrides(a for a in args if not a.startswith("-")), *args]


def compose_config(output_dir: Path, *overrides: str):
    """The run config exactly as ``python run.py TINY... overrides...`` would see it, writing to ``output_dir``."""
    return compose_run_config(output_dir, [*tiny_overrides(overrides), *overrides])


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)`` -> a composed config whose outputs go to a fresh temp dir."""
    counter = iter(range(1000))

    def make(*overrides: str):
        return compose_config(tmp_path / f"run{next(counter)}", *overrides)

    return make


def pytest_collection_modifyitems(config, items):
    if not SHARED_DATA.is_dir():
        skip = pytest.mark.skip(reason=f"needs the shared data folder {SHARED_DATA}, which is absent")
        for item in items:
            if "shared_data" in item.keywords:
                item.add_marker(skip)


class CrashAt:
    """A test callback (added through the config, as a user would add one) that fails a run at a step."""

    def __new__(cls, step: int):
        import lightning as L

        class _Crash(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    raise RuntimeError(f"planted failure at step {step}")

        return _Crash()


class NanAt:
    """A test callback that plants NaN weights in one chunk's first block before a step: that chunk's loss is
    nan from then on, as after an overflow, while the other chunks train on."""

    def __new__(cls, step: int, chunk: int):
        import lightning as L
        import torch

        class _Nan(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    first_block = pl_module.net.plan[chunk - 1].layers[0]
                    with torch.no_grad():
                        for p in pl_module.net.gpt.blocks[first_block].parameters():
                            p.fill_(float("nan"))

        return _Nan()


class FullDisk:
    """Opens files whose writes fail with ENOSPC once ``budget`` bytes have gone through all of them
    (``budget=0``: at once), as on a disk that fills up; installed as ``locallearn.atomic._fdopen``."""

    def __init__(self, budget: int = 0):
        self.budget = budget

    def __call__(self, fd, mode="r", **kwargs):
        import os

        return _Limited(os.fdopen(fd, mode, **kwargs), self)


class _Limited:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        import errno
        import os

        size = len(data.encode() if isinstance(data, str) else data)
        if size > self._disk.budget:
            self._f.write(data[:self._disk.budget])  # what still fits, as a real disk would take it
            self._disk.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.budget -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


class DiskFullAt:
    """A test callback: from ``step`` on, every atomic write of the run fails with ENOSPC (a full disk)."""

    def __new__(cls, step: int):
        import lightning as L

        import locallearn.atomic

        class _Full(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    locallearn.atomic._fdopen = FullDisk(0)

            def teardown(self, trainer, pl_module, stage):
                import os

                locallearn.atomic._fdopen = os.fdopen

        return _Full()
