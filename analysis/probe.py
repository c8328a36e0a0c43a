"""Probe the features of every chunk of a finished run or multirun against end-to-end training.

    python analysis/probe.py runs=logs/multiruns/<sweep dir>              # UPOS probes + CKA, chunks=1 as reference
    python analysis/probe.py runs=<run dir> task=deprel probe=mlp reference=<end-to-end run dir>
    python analysis/probe.py runs=<synthetic run dir> task=category cka=null

Writes probes.csv, cka.csv, PNG figures, summary.md and a TensorBoard dir (tb/) into
logs/probes/<date>_<overrides>/; hidden states are cached in each run's probe_features/.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import locallearn  # noqa: F401  (registers the ${ll.*} resolvers conf/ uses)
from locallearn.errors import ConfigError
from locallearn.probing.report import probe_runs

log = logging.getLogger("locallearn.probe")


@hydra.main(version_base="1.3", config_path="../conf", config_name="probing")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        probe_runs(cfg, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("wrote probes.csv, figures and summary.md to %s", out)


def quote_paths(argv: list[str]) -> list[str]:
    """Run directories are named after their overrides ("chunks=1,4,data=ewt"), which Hydra's override
    grammar would parse; quote the values of the path keys so they can be passed as they are."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in PATH_KEYS and not value.startswith(("'", '"')):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


PATH_KEYS = ("runs", "reference", "ewt_path")

if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    main()
