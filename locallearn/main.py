"""The training command: ``locallearn-train``, ``python -m locallearn`` and the repository's ``python run.py``.

    locallearn-train chunks=4 data=shakespeare        # any directory: outputs go to ./logs (or $LOCALLEARN_LOGS)
    locallearn-train -m chunks=1,2,4 seed=0,1         # a multirun; chunks=1 is end-to-end backprop

The Hydra configs ship inside the package (``locallearn/conf``; ``conf/`` in a checkout links to them).
"""


import math
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from locallearn.cli import composed_config, prepare_command_line
from locallearn.config import CONF_DIR
from locallearn.errors import ConfigError, OutputError, PipelineError, TrainingDiverged

# The jobs of a multirun that ran in this process (the basic launcher), and those that failed or were refused: a
# sweep in which every one failed exits non-zero (launchers that run jobs elsewhere report through their own logs).
JOBS = {"ran": 0, "failed": 0, "sweep_dir": None}


# An absolute folder: Hydra would read a relative one as the module locallearn.conf when run as a module.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        JOBS["ran"] += 1
        JOBS["sweep_dir"] = HydraConfig.get().sweep.dir
    result = job(cfg)
    JOBS["failed"] += result is not None and math.isinf(result)
    return result


def job(cfg: DictConfig) -> float | None:
    from locallearn.runner import record_config_error, train  # here: --help and bad options need no Lightning

    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(2)
        # In a sweep the other jobs go on: record why this one failed where the reports look for it
        # (analysis/compare.py lists it), and give the sweeper the worst loss, so that an optimizer
        # steers away from the setting rather than aborting its study.
        record_config_error(cfg, e)
        return math.inf
    except (TrainingDiverged, PipelineError, OutputError) as e:
        # summary.json ("diverged: ..." or "failed: ..."), diagnostics.json and the last good checkpoint are kept.
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(1)
        return math.inf
    return objective(summary)


def objective(summary: dict) -> float | None:
    """What a sweeper minimizes: the last chunk's final val loss (+inf if it diverged)."""
    final = list((summary.get("val_loss") or {}).values())
    if not final:
        return None
    return final[-1] if math.isfinite(final[-1]) else math.inf


# Overrides whose values are paths (run directories carry "=" and "," in their names): quoted for Hydra.
PATH_KEYS = ("ckpt_path", "resume", "data.path", "data.val_path", "data.test_path", "data.tokenizer_file",
             "paths.log_dir", "paths.data_dir", "hydra.run.dir", "hydra.sweep.dir")


def entry() -> None:
    """The console entry point (pyproject.toml): the command line in sys.argv."""
    # The mode is the composed config's (an experiment or variant file may set it), as in every other process.
    if os.environ.get("RANK", "0") != "0" and (composed_config(sys.argv[1:], PATH_KEYS) or {}).get("mode") == \
            "pipeline":
        # torchrun rank > 0 of a pipeline run: rank 0 sends the config; no Hydra run directory of its own
        from locallearn.pipeline.worker import worker_from_env

        worker_from_env()
        sys.exit(0)
    # Lightning starts every further data-parallel process with this process's command line, already prepared.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        try:  # before Hydra composes, so that an unknown option gets our one line, not Hydra's search path
            sys.argv[1:] = prepare_command_line(sys.argv[1:], "config", PATH_KEYS, resume=True)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    main()
    if JOBS["ran"] and JOBS["failed"] == JOBS["ran"]:
        print(f"error: all {JOBS['ran']} jobs of the sweep failed or were refused (each says why above and in its "
              f"summary.json under {JOBS['sweep_dir']}); fix the setting they share and run it again.", file=sys.stderr)
        sys.exit(1)
