"""Which runs a probe analysis reads, and what each is compared with.

Every run is compared with the end-to-end run of the *same seed*: the ``chunks=1`` run among
``runs`` whose other settings (model, data, objective, optimizer, schedule, steps) are the same,
so that a difference in CKA or accuracy is the method's, not the initialization's. ``reference=``
forces one end-to-end run for all. Runs that differ only in their seed form a seed group, over which
the report gives mean ± std. Every check here runs before any feature is extracted.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from locallearn.analysis.sweeps import job_order
from locallearn.config import flatten, under
from locallearn.errors import ConfigError
from locallearn.probing.features import TrainedRun
from locallearn.probing.tasks import SYNTHETIC_TASKS, UD_TASKS

# Settings that do not change what a run learns (where it writes, how it logs, how long between evaluations).
# trainer: only these of its keys change the training itself.
# learner: its arguments are interpolations of keys compared on their own (seed, grad_clip, optim.*); its class is not.
BOOKKEEPING = ("paths", "hydra", "ckpt_path", "callbacks", "logger", "trainer", "learner.seed", "learner.grad_clip",
               "learner.loss_weights", "learner.chunk_lr", "learner.hypergrad_lr")
TRAINER_KEYS = ("trainer.max_steps", "trainer.precision", "trainer.devices", "trainer.accumulate_grad_batches")
SEED_KEYS = ("seed", "data.seed")  # data.seed is ${seed}: the batch order
# How a model is cut into chunks and trained locally: the end-to-end reference differs in these.
LOCAL_KEYS = ("chunks", "boundaries", "overlap", "interlock", "head", "loss_weights", "switch", "mode", "pipeline",
              "optim.chunk_lr")
# Data settings that do not change the data (its path is compared by name: the same corpus may move).
DATA_LOADING = ("data.seed", "data.batch_size", "data.block_size", "data.val_windows", "data.path", "data.val_path",
                "data.test_path", "data.tokenizer_file", "data.name")


@dataclass(eq=False)
class Model:
    """A probed model: a trained run or a random-init baseline, with what the tables call it."""

    run: TrainedRun
    label: str  # "K=4 chunked", "end-to-end", "random init" (+ " [run dir]" where several share one)
    overrides: str
    chunks: int
    variant: str
    reference: "Model | None" = None  # the end-to-end model CKA compares it with

    @property
    def trained(self) -> bool:
        return self.run.ckpt is not None

    @property
    def seed(self) -> int:
        return int(self.run.cfg.seed)


def find_runs(path) -> list[Path]:
    """A run directory itself, or the run directories inside a multirun directory (in job order)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"runs={path} is not a directory; pass a run or multirun directory.")
    if (path / "config.yaml").is_file():
        return [path]
    runs = sorted((p for p in path.iterdir() if (p / "config.yaml").is_file()), key=job_order)
    if not runs:
        raise ConfigError(f"runs={path} holds no run (no config.yaml in it or its subdirectories); pass a run "
                          f"directory or a multirun directory.")
    return runs


def variant_of(cfg) -> str:
    """A short name for how a run trains: "end-to-end", or the local-learning settings that differ from the defaults."""
    if cfg.chunks == 1 and not cfg.get("overlap"):
        return "end-to-end"
    parts = ["chunked"]
    if cfg.get("overlap"):
        parts.append(f"overlap={cfg.overlap}")
    if cfg.get("interlock", 1) > 1:
        parts.append(f"interlock={cfg.interlock}")
    method = (cfg.get("method") or {}).get("_target_", "")
    if method and not method.endswith(".Local"):
        parts.append("method=" + method.rsplit(".", 1)[-1].replace("Gradients", "").lower())
    head = str(cfg.head.get("_target_", "")).rsplit(".", 1)[-1].replace("Head", "").lower()
    if head and head != "linear":
        parts.append(f"head={head}")
    objective = instantiate(cfg.objective).name
    if objective != "clm":
        parts.append(f"objective={objective}")
    if cfg.get("switch") and cfg.switch.get("at") is not None:
        parts.append(f"switch.at={cfg.switch.at}")
    return " ".join(parts)


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    items = yaml.safe_load(path.read_text()) or []
    return " ".join(o for o in items if not o.startswith(("trainer.enable_progress_bar", "paths.")))


def make_model(run: TrainedRun) -> Model:
    if run.ckpt is None:
        return Model(run, "random init", "", int(run.cfg.chunks), "random init")
    variant = variant_of(run.cfg)
    label = variant if variant == "end-to-end" else f"K={run.cfg.chunks} {variant}"
    return Model(run, label, _overrides(run.dir), int(run.cfg.chunks), variant)


def unique_labels(models: list[Model]) -> None:
    """Models that share a label (runs that differ only in seed): tell them apart by directory."""
    count: dict[str, int] = {}
    for model in models:
        count[model.label] = count.get(model.label, 0) + 1
    for model in models:
        if count[model.label] > 1:
            model.label += f" [{model.run.dir.name}]"


# -- settings ------------------------------------------------------------------------------------

def _flat(tree, prefix="") -> dict[str, str]:
    """{dotted key: the leaf as JSON} (comparable, hashable)."""
    return {k: json.dumps(v, sort_keys=True) for k, v in flatten(tree, prefix).items()}


def settings(run: TrainedRun, ignore=()) -> dict[str, str]:
    """The run's resolved config as {dotted key: value}, less bookkeeping and ``ignore``; the data as
    :func:`data_identity` gives it."""
    flat = _flat(OmegaConf.to_container(run.cfg, resolve=True))
    keep = {k: v for k, v in flat.items() if not k.startswith("data.") and not under(k, ignore)
            and (not under(k, BOOKKEEPING) or k in TRAINER_KEYS)}
    return keep | data_identity(run)


def data_identity(run: TrainedRun) -> dict[str, str]:
    """What the run was trained on: the data settings that change the data, the corpus's file or folder
    name and the vocabulary."""
    data = {k: v for k, v in _flat(OmegaConf.to_container(run.cfg.data, resolve=True), "data.").items()
            if not under(k, DATA_LOADING)}
    for key in ("path", "val_path"):
        if run.cfg.data.get(key):
            data[f"data.{key} (name)"] = Path(str(run.cfg.data[key])).name
    data["vocabulary"] = hashlib.sha1("\0".join(run.vocab).encode()).hexdigest()
    return data


def differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# -- checks ----------------------------------------------------------------------------------------

def _data_name(run: TrainedRun) -> str:
    return str(run.cfg.data.get("_target_", "")).rsplit(".", 1)[-1]


# Keys of a task's data config that say how batches are drawn, not what the task is.
_BATCHING = ("_target_", "batch_size", "block_size", "task_seed", "n_train", "seed", "val_windows", "val_seed")


def run_task(run: TrainedRun):
    """The synthetic task (:class:`locallearn.data.tasks.Task`) a run trained on, or None for a corpus."""
    from hydra.utils import get_class

    from locallearn.data.tasks import TaskDataModule

    target = run.cfg.data.get("_target_")
    cls = get_class(target) if target else None
    if not (isinstance(cls, type) and issubclass(cls, TaskDataModule)):
        return None
    args = {k: v for k, v in run.cfg.data.items() if k not in _BATCHING}
    return cls.task_class(int(run.cfg.data.block_size) + 1, **args)


def _task_identity(run: TrainedRun) -> dict:
    return {k: v for k, v in run.cfg.data.items() if k not in ("seed", "batch_size", "n_train", "val_windows")}


def check_task(task: str, runs: list[TrainedRun]) -> None:
    """The task must read the kind of data each run (and the reference) was trained on, of one grammar or task."""
    tasks = [run_task(r) for r in runs]
    if any(t is not None for t in tasks):
        for run, t in zip(runs, tasks):
            if t is None:
                raise ConfigError(f"{run.dir} was trained on {_data_name(run)}, the other runs on a synthetic task; "
                                  f"probe runs of one data set at a time.")
            if task not in t.label_classes:
                raise ConfigError(f"task={task} is not a probe label of data={t.name} ({run.dir}); use one of "
                                  f"{', '.join(t.label_classes)}.")
        first = _task_identity(runs[0])
        for run in runs[1:]:
            if (diff := differences(first, _task_identity(run))):
                raise ConfigError(f"{run.dir} was trained on another task than {runs[0].dir} (data.{diff[0]} "
                                  f"differs); probe runs of one task at a time.")
        return
    if task not in UD_TASKS + SYNTHETIC_TASKS:
        raise ConfigError(f"task={task} is unknown; use one of {', '.join(UD_TASKS + SYNTHETIC_TASKS)} (or a "
                          f"task's probe label for runs trained on data=induction|mqar|khop).")
    for run in runs:
        synthetic = _data_name(run) == "SyntheticDataModule"
        if task in SYNTHETIC_TASKS and not synthetic:
            raise ConfigError(f"task={task} needs runs trained on data=synthetic, but {run.dir} was trained on "
                              f"{_data_name(run)}; use task=upos or task=deprel for runs trained on text.")
        if task in UD_TASKS and run.tokenizer is None:
            raise ConfigError(f"task={task} reads a treebank's text, but {run.dir} was trained on the synthetic "
                              f"language's words; use task={', task='.join(SYNTHETIC_TASKS[:-1])} (or the "
                              f"lexical control task=category) for it.")
    seeds = {int(r.cfg.data.corpus_seed) for r in runs if _data_name(r) == "SyntheticDataModule"}
    if len(seeds) > 1:
        raise ConfigError(f"the runs use different grammars (data.corpus_seed={sorted(seeds)}); probe runs of one "
                          f"grammar at a time.")


def check_reference(cfg, ref: TrainedRun, runs: list[TrainedRun]) -> None:
    """A forced reference must be end-to-end and trained on the same data as every probed run."""
    if int(ref.cfg.chunks) != 1:
        raise ConfigError(f"reference={cfg.reference} was trained with chunks={ref.cfg.chunks}; the CKA reference "
                          f"must be an end-to-end run (chunks=1).")
    for run in runs:
        diff = differences(data_identity(ref), data_identity(run))
        if diff:
            raise ConfigError(f"reference={cfg.reference} was trained on other data than {run.dir} (they differ in "
                              f"{', '.join(diff)}); pass as reference= an end-to-end run trained on the same data.")


def check_outside_runs(paths: dict[str, Path], runs: list[TrainedRun]) -> None:
    """Only a run writes into its directory: refuse output or cache paths inside a probed run."""
    for key, path in paths.items():
        path = Path(path).resolve()
        for run in runs:
            if path == run.dir.resolve() or run.dir.resolve() in path.parents:
                raise ConfigError(f"{key}={path} lies inside the run directory {run.dir}, which only its run may "
                                  f"write; point {key} outside every probed run.")


# -- pairing -------------------------------------------------------------------------------------

def pair_references(models: list[Model], forced: Model | None, runs_arg) -> None:
    """Set each model's ``reference``: ``forced``, else itself for an end-to-end run, else the end-to-end
    run of the same seed and the same settings apart from chunking (the first in job order)."""
    e2e = [m for m in models if m.trained and m.chunks == 1]
    for model in models:
        if forced is not None:
            model.reference = forced
        elif model.trained and model.chunks == 1:
            model.reference = model
        else:
            want = _reference_key(model)
            model.reference = next((m for m in e2e if _reference_key(m) == want), None)
            if model.reference is None:
                raise ConfigError(f"{model.run.dir} (chunks={model.chunks}, seed={model.seed}) has no end-to-end run "
                                  f"to compare with by CKA: runs={runs_arg} holds no chunks=1 run with seed "
                                  f"{model.seed} and the same other settings{_nearest(e2e, want)}; add that run to "
                                  f"runs, pass reference=<an end-to-end run dir>, or set cka=null.")


def _reference_key(model: Model) -> dict[str, str]:
    return settings(model.run, ignore=LOCAL_KEYS) | {"seed": str(model.seed)}


def _nearest(e2e: list[Model], want: dict) -> str:
    """How the closest end-to-end run differs from the one wanted, for the error message."""
    if not e2e:
        return ""
    diff, name = min(((differences(_reference_key(m), want), m.run.dir.name) for m in e2e), key=lambda d: len(d[0]))
    return f" (the nearest, {name}, differs in {', '.join(diff)})"


def seed_groups(models: list[Model]) -> list[list[Model]]:
    """Models that differ only in their seed (trained runs and random-init baselines apart), two or more."""
    groups: dict[str, list[Model]] = {}
    for model in models:
        key = json.dumps([model.trained, settings(model.run, ignore=SEED_KEYS)], sort_keys=True)
        groups.setdefault(key, []).append(model)
    return [g for g in groups.values() if len({m.seed for m in g}) > 1]
