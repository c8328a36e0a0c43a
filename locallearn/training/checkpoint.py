"""Checkpoints: never half written, ``last.ckpt`` always the latest validation, and refused when they do not fit.

* :class:`AtomicCheckpointIO` (``trainer.plugins``): the checkpoint is serialized in memory, then written
  through :func:`locallearn.atomic.atomic_open` (temporary file beside the target, fsync, rename). Lightning's
  own save goes through a temporary file in ``$TMPDIR``; when that is another filesystem the rename fails
  and the fallback copy truncates the good file before writing it again.
* :class:`Checkpoints` (``callbacks.model_checkpoint``): ``best.ckpt`` by the monitored metric and
  ``last.ckpt`` after *every* validation (Lightning 2.6 saves ``last`` only at a step where a top-k
  checkpoint was saved, i.e. only when the best improves).
* :func:`check_compatible`: a checkpoint made for another model, chunk plan, head, objective or data is
  refused with one line that names what differs, instead of a ``load_state_dict`` traceback.
"""

import io
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from locallearn.atomic import atomic_open
from locallearn.config import IDENTITY, differences, summarize, upgrade_config
from locallearn.errors import ConfigError

# Settings a checkpoint's tensors are made for; seed, batch order and size may differ (fine-tuning from a run).
CHECKPOINT_IDENTITY = tuple(k for k in IDENTITY if k != "seed")
_FREE = ("data.seed", "data.batch_size", "data.val_windows")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, then one atomic write beside the target."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_open(path, "wb") as f:
            f.write(buffer.getbuffer())


class Checkpoints(ModelCheckpoint):
    """:class:`ModelCheckpoint` that also writes ``last.ckpt`` at every validation; ``last_step`` is its step."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("enable_version_counter", False)  # a run's directory is its own: no last-v1.ckpt
        super().__init__(*args, **kwargs)
        self.last_step: int | None = None  # the global step last.ckpt holds (None: not written by this process)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Leftovers of a write that a kill interrupted (the run directory is this run's alone).
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for stale in Path(self.dirpath).glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.last_step is None and self.last_model_path and Path(self.last_model_path).is_file():
            self.last_step = trainer.global_step  # resumed from that file: it holds the step training restarts at

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self.last_step = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not trainer.sanity_checking and not trainer.fast_dev_run
                and trainer.state.fn == TrainerFn.FITTING and self.last_step != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def last_checkpoint(trainer) -> Checkpoints | None:
    """The trainer's :class:`Checkpoints` once it has a ``last.ckpt`` (its path and ``last_step``), else None."""
    return next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "last_step", None) is not None), None)


def read_checkpoint(path) -> dict:
    """The checkpoint at ``path`` (memory-mapped: only what is read is loaded), or a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise ConfigError(f"ckpt_path={path} is not a readable checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}); pass a .ckpt written by a locallearn run.") from None


def check_compatible(path, config: dict, state_dict: dict) -> None:
    """Refuse a checkpoint made for other settings (:data:`CHECKPOINT_IDENTITY`) or other tensor shapes."""
    ckpt = read_checkpoint(path)
    saved = (ckpt.get("hyper_parameters") or {}).get("config") or {}
    if not saved:
        raise ConfigError(f"ckpt_path={path} holds no locallearn run config; pass a checkpoint written by "
                          f"python run.py.")
    diffs = differences(upgrade_config(saved), config, CHECKPOINT_IDENTITY, ignore=_FREE)
    if diffs:
        raise ConfigError(f"ckpt_path={path} was made for other settings: {summarize(diffs)}; resume it with its "
                          f"own settings (resume=<its run dir>) or train without ckpt_path.")
    theirs = ckpt.get("state_dict") or {}
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in state_dict.items()
              if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    missing = sorted(set(state_dict) ^ set(theirs))
    if shapes or missing:
        what = shapes[0] if shapes else f"{len(missing)} tensor(s) such as {missing[0]} in only one of them"
        raise ConfigError(f"ckpt_path={path} does not fit this model ({what}); it was made by a run with other "
                          f"data or code, so train without ckpt_path.")


def rng_state() -> dict:
    """The random state a resumed run needs to draw what the uninterrupted one would (dropout masks)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
