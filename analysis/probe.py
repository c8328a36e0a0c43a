"""Probe the features of every chunk of a finished run or multirun against end-to-end training.

    python analysis/probe.py runs=logs/multiruns/<sweep dir>   # UPOS probes + CKA vs the same-seed chunks=1 run
    python analysis/probe.py runs=<run dir> task=deprel probe=mlp reference=<end-to-end run dir>
    python analysis/probe.py runs=<synthetic run dir> task=agreement cka=null
    python analysis/probe.py runs=<sweep dir> treebank=<a UD treebank folder, or [dev.conllu,test.conllu]>

Writes probes.csv, cka.csv, PNG figures, summary.md and a TensorBoard dir (tb/) into
logs/probes/<date>_<overrides>/; hidden states are cached in logs/probes/cache/ (cache_dir). It
never writes into a run directory.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import locallearn  # noqa: F401  (registers the ${ll.*} resolvers conf/ uses)
from locallearn.cli import prepare_command_line
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


PATH_KEYS = ("runs", "reference", "treebank", "cache_dir")

if __name__ == "__main__":
    try:  # before Hydra composes: our one line for a bad option or key, and path values quoted
        sys.argv[1:] = prepare_command_line(sys.argv[1:], "probing", PATH_KEYS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
