"""OmegaConf resolvers used by ``conf/`` (registered when :mod:`locallearn` is imported).

* ``${ll.root:}``: the project root (the folder holding ``run.py`` and ``conf/``), so that log and
  data paths do not depend on the directory a run is started from.
* ``${ll.tag:${hydra.job.override_dirname}}``: a run's overrides as a folder-name fragment
  ("defaults" when there are none), so that run and sweep directories say what they hold.
* ``${ll.sweep_tag:${hydra.job.override_dirname}}``: the same for a whole multirun, from the
  sweep's own overrides ("chunks=1,2,4"). Hydra re-resolves ``hydra.sweep.dir`` inside every job,
  where ``override_dirname`` is that job's ("chunks=1"). This resolver is cached, and OmegaConf keys
  its cache by the argument's unresolved text; the launcher resolves it first, Hydra copies resolver
  caches into every job (as it does for ``${now:}``), so all jobs of a sweep share one directory.
"""

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def _tag(overrides: str | None) -> str:
    tag = (overrides or "defaults").replace("/", "-").replace(" ", "")
    if len(tag) > 120:  # stay well inside file-name limits; the hash keeps long tags distinct
        tag = tag[:100] + "_" + hashlib.md5(tag.encode()).hexdigest()[:8]
    return tag


def register_resolvers():
    OmegaConf.register_new_resolver("ll.root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("ll.tag", _tag, replace=True)
    OmegaConf.register_new_resolver("ll.sweep_tag", _tag, use_cache=True, replace=True)


def quote(value: str) -> str:
    """``value`` quoted for Hydra's override grammar (run directories carry "=" and "," in their names)."""
    return f"'{value}'" if "'" not in value else f'"{value}"'


def compose_run_config(output_dir, overrides=(), config_name: str = "config"):
    """The run config exactly as ``python run.py <overrides>`` would see it, writing to ``output_dir``
    (for code that runs training without the command line: tests, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)  # what ${hydra:...} resolves against; the job config itself has no hydra node
    with open_dict(cfg):
        del cfg.hydra
    return cfg
