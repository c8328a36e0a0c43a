"""Run directories: every run gets its own, and only the run that owns a directory writes into it.

* A new run (``python run.py ...``) or sweep (``-m``) gets a fresh directory, created with an exclusive
  ``os.mkdir``: two runs started in the same second with the same overrides get ``<name>`` and
  ``<name>_2``, never one directory between them.
* ``hydra.run.dir=<dir>`` (or ``hydra.sweep.dir=``) names the directory yourself; it must not hold
  anything yet.
* ``resume=<run dir>`` continues a run in its own directory: its overrides are read back from
  ``<run dir>/.hydra/overrides.yaml`` (overrides given after ``resume=`` win) and training continues from
  ``checkpoints/last.ckpt``. It is accepted only as a continuation of that run (same :data:`IDENTITY`
  settings); anything else is refused with one line before any file is touched.

These checks run in :class:`RunDirectory`, a Hydra callback (conf/hydra/default.yaml) whose
``on_run_start`` / ``on_multirun_start`` come before Hydra creates or writes anything. Hydra's own
``.hydra/`` files are written by :func:`save_hydra_files` once a run's config has passed its checks
(``hydra.output_subdir: null``), so a refused run writes nothing.
"""

import fcntl
import logging
import os
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from locallearn.atomic import write_text
from locallearn.checks import LR_RANGE, PROBING, RUN, check_config
from locallearn.config import IDENTITY, differences, load_saved, quote, summarize, upgrade_override
from locallearn.errors import ConfigError

# What makes a run the run it is: a continuation (resume=) must keep all of these (whole groups, or single
# keys: another optimizer or schedule could not take over the checkpoint's state).
LOCK = ".lock"  # held (flock) by the process that runs in the directory, for as long as it lives
_locks: dict[str, int] = {}  # directory -> the open file descriptor of its lock
# Overrides of the original run that a continuation replaces rather than repeats.
_RESUME_KEYS = ("resume", "ckpt_path")


def _refuse(message: str):
    """One line on stderr and exit code 2, from inside Hydra (its ``run_and_report`` would print a traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_resume(overrides: list[str], multirun: bool = False) -> list[str]:
    """Turn the overrides ``resume=<run dir> [...]`` into those that continue that run in place.

    The run's own overrides come first (so later ones win), then the new ones, then its checkpoint and its
    directory. Overrides without ``resume=`` are returned as they are.
    """
    argv = overrides
    given = [a for a in argv if _key(a) == "resume" and "=" in a]
    if not given:
        return argv
    value = given[-1].split("=", 1)[1].strip("'\"")
    if value in ("", "null"):
        return [a for a in argv if _key(a) != "resume"]
    run_dir = Path(value).expanduser().resolve()
    if multirun:
        raise ConfigError(f"resume={value} continues one run, not a sweep; drop -m.")
    for clash in ("ckpt_path", "hydra.run.dir"):
        if any(_key(a) == clash for a in argv):
            raise ConfigError(f"resume={value} sets {clash} itself (to that run's own); drop the {clash} override.")
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "config.yaml").is_file() or not overrides.is_file():
        raise ConfigError(f"resume={value} is not a run directory (no config.yaml and .hydra/overrides.yaml in it); "
                          f"pass the directory of the run to continue.")
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"resume={value} has no checkpoints/last.ckpt (the run stopped before its first "
                          f"validation), so there is nothing to continue; start it again as a new run.")
    new = [a for a in argv if _key(a) != "resume"]
    replaced = {_key(a) for a in new} | set(_RESUME_KEYS)
    saved = [upgrade_override(o) for o in yaml.safe_load(overrides.read_text()) or []]
    original = [o for o in saved if o and _key(o) not in replaced]
    return [*original, *new, f"resume={quote(str(run_dir))}", f"ckpt_path={quote(str(last))}",
            f"hydra.run.dir={quote(str(run_dir))}"]


def claim_fresh(path: Path) -> Path:
    """Create ``path`` (or ``path_2``, ``path_3`` ... if taken) exclusively and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}_{n}")


def lock(directory: Path) -> bool:
    """Hold ``<directory>/.lock`` for the rest of this process (an exclusive ``flock``, which the system releases
    when the process ends, however it ends); False if another live process holds it."""
    key = str(Path(directory).resolve())
    if key in _locks:
        return True
    fd = os.open(Path(directory) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _locks[key] = fd
    return True


def _explicit(config: DictConfig, key: str) -> bool:
    return any(_key(o) == key for o in config.hydra.overrides.hydra)


def _writable_error(path: Path, config: DictConfig, key: str, error: OSError) -> str:
    reason = error.strerror or type(error).__name__
    if not _explicit(config, key):
        return (f"paths.log_dir={config.paths.log_dir} is not writable ({reason} for {error.filename or path}); "
                f"point paths.log_dir at a directory you can write to.")
    return f"{key}={path} cannot be created ({reason}); choose a directory you can write to."


def _claim(config: DictConfig, key: str) -> Path:
    """The run or sweep directory ``key`` names, created for this run alone (one line and exit 2 if it cannot be)."""
    path = Path(str(OmegaConf.select(config, key))).expanduser()
    try:
        if not _explicit(config, key):
            path = claim_fresh(path)
            lock(path)
            return path
        path.mkdir(parents=True, exist_ok=True)
        if any(p.name != LOCK for p in path.iterdir()):
            _refuse(f"{key}={path} already holds files (another run's outputs); a run writes only into a directory "
                    f"of its own, so drop {key} (each run gets a fresh one), pick an empty directory, or continue "
                    f"a run with resume=<its directory>.")
        if not lock(path):
            _refuse(f"{key}={path} is in use by a run started at the same time (it holds {LOCK}); pick another "
                    f"directory.")
    except OSError as e:
        _refuse(_writable_error(path, config, key, e))
    return path


def _set(config: DictConfig, key: str, value: Path) -> None:
    with read_write(config.hydra):
        OmegaConf.update(config, key, str(value), merge=False)


def _check_continuation(config: DictConfig) -> None:
    run_dir = Path(str(config.hydra.run.dir))
    saved = OmegaConf.to_container(load_saved(run_dir / "config.yaml"))
    now = {k: _plain(config[k]) for k in {key.split(".")[0] for key in IDENTITY} if k in config}
    diffs = differences(saved, now)
    if diffs:
        _refuse(f"resume={run_dir} would change the run's own settings: {summarize(diffs)}; a continuation keeps "
                f"{', '.join(IDENTITY)}, so drop those overrides or start a new run (without resume=).")
    if not os.access(run_dir, os.W_OK):
        _refuse(f"resume={run_dir} is not writable; continue it where you can write, or copy it first.")
    if not lock(run_dir):
        _refuse(f"resume={run_dir} is still running (another process holds its {LOCK}); let it finish or stop it, "
                f"then resume it.")


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _ddp_child(config: DictConfig) -> bool:
    # Lightning relaunches the command once per extra DDP process, into rank 0's run directory.
    return os.environ.get("LOCAL_RANK", "0") != "0" or str(config.hydra.job.name).startswith("train_ddp_process_")


# The table of checked ranges for each Hydra app of the package, by its config name.
TABLES = {"config": RUN, "probing": PROBING, "lr_range_test": {**RUN, **LR_RANGE}}


def quiet_sweep_plugins(sweeper_target: str) -> None:
    """Keep a sweep's log to the sweep: alembic's plugin setup lines (optuna's database layer) and optuna's own INFO
    (it resets its logger's level when imported, so its verbosity is set through its API)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if "optuna" in sweeper_target:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


class RunDirectory(Callback):
    """Hydra callback: claim a fresh run or sweep directory, or accept a continuation, before anything is written."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if _ddp_child(config):
            return
        try:  # a refused run leaves nothing behind, not even an empty directory (build() checks again)
            check_config(config, TABLES.get(str(config.hydra.job.config_name), RUN))
        except ConfigError as e:
            _refuse(str(e))
        if config.get("resume"):
            _check_continuation(config)
            return
        path = _claim(config, "hydra.run.dir")
        _set(config, "hydra.run.dir", path)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("resume"):
            _refuse("resume= continues one run, not a sweep; drop -m.")
        quiet_sweep_plugins(str(config.hydra.sweeper.get("_target_", "")))
        path = _claim(config, "hydra.sweep.dir")
        _set(config, "hydra.sweep.dir", path)
        # Every job's config is composed again from these overrides (Hydra's load_sweep_config): pin the directory.
        with read_write(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quote(str(path))}")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        # A sweep's job: its directory is held as a run's is (resume= of a job still running is refused).
        if not _ddp_child(config):
            lock(Path(str(config.hydra.runtime.output_dir)))


def save_hydra_files(cfg: DictConfig, output_dir) -> None:
    """What Hydra would write to ``.hydra/`` (the composed config, Hydra's own, the overrides), atomically."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    out = Path(output_dir) / ".hydra"
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(out / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    write_text(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))

