"""Train a transformer cut into locally trained chunks.

    python run.py                      # defaults: synthetic data, model=small, chunks=2
    python run.py chunks=4 mode=sequential data=shakespeare
    python run.py -m chunks=1,2,4      # a multirun; chunks=1 is end-to-end backprop
"""

import sys

import hydra
from omegaconf import DictConfig

import locallearn  # noqa: F401  (registers the ${ll.*} resolvers conf/ uses)
from locallearn.config import check_group_choices
from locallearn.errors import ConfigError
from locallearn.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("best_val_loss")  # what a sweeper (e.g. Optuna) minimizes


if __name__ == "__main__":
    try:  # before Hydra composes, so that an unknown option gets our one line, not Hydra's search path
        check_group_choices(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
