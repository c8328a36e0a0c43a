"""LR range test per chunk (Smith 2017) on a fresh model of any run config.

    python analysis/lr_range_test.py chunks=4 data=shakespeare            # model=small by default
    python analysis/lr_range_test.py chunks=4 lr_range.lr_max=0.1 lr_range.steps=200 mode=sequential

Writes lr_range.csv (per chunk and step: lr, loss, smoothed loss), suggestions.csv and
suggestions.json, lr_range.png and tb/ into logs/lr_range/<date>_<overrides>/, and prints the
suggestions with the override that applies them: optim.chunk_lr=[...].
"""

import csv
import logging
import sys
from pathlib import Path

import hydra
import matplotlib.image
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch.utils.tensorboard import SummaryWriter

import locallearn  # noqa: F401  (registers the ${ll.*} resolvers conf/ uses)
from locallearn.analysis import loss_plots
from locallearn.atomic import atomic_open, write_json
from locallearn.build import quiet_lightning
from locallearn.checks import LR_RANGE, check_config
from locallearn.cli import prepare_command_line
from locallearn.errors import ConfigError
from locallearn.rundir import save_hydra_files
from locallearn.runner import build
from locallearn.training.lr_range_test import RangeSettings, run

log = logging.getLogger("locallearn.training.lr_range_test")


def settings_of(cfg: DictConfig) -> tuple[RangeSettings, str, str]:
    check_config(cfg, LR_RANGE)
    node = dict(cfg.lr_range)
    suggest, device = node.pop("suggest"), node.pop("device")
    settings = RangeSettings(**node)
    settings.check()
    return settings, suggest, device


def range_test(cfg: DictConfig, out: Path) -> list:
    settings, suggest, device = settings_of(cfg)  # bad settings fail before any data is loaded
    save_hydra_files(cfg, out)  # hydra.output_subdir is null: .hydra/ is written once the config passed its checks
    quiet_lightning()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    r = build(cfg)
    r.datamodule.setup("fit")
    tb = SummaryWriter(str(out / "tb"))

    def on_step(i, lr, losses, smoothed):
        tb.add_scalar("lr_range/lr", lr, i)
        for k, (loss, s) in enumerate(zip(losses, smoothed), start=1):
            tb.add_scalar(f"lr_range/loss/chunk{k}", loss, i)
            if s == s:  # not nan: the chunk is still in the test
                tb.add_scalar(f"lr_range/smoothed/chunk{k}", s, i)

    results = run(r.module, r.datamodule.train_dataloader(), settings, device, on_step)
    with atomic_open(out / "lr_range.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["chunk", "step", "lr", "loss", "smoothed"])
        for c in results:
            for i, (lr, loss, s) in enumerate(zip(c.lrs, c.losses, c.smoothed)):
                w.writerow([c.chunk, i, lr, loss, s])
    rows = [{"chunk": c.chunk, "steepest": c.steepest, "min_loss_lr": c.min_loss_lr, "min_loss_over_10":
             c.min_loss_lr / 10, "min_loss": c.min_loss, "diverged_at": c.diverged_at, "note": c.note}
            for c in results]
    with atomic_open(out / "suggestions.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    chosen = [c.suggestion(suggest) for c in results]
    override = "optim.chunk_lr=[" + ",".join(f"{lr:.3g}" for lr in chosen) + "]"
    write_json(out / "suggestions.json", {"settings": vars(settings) | {"ema_factor": settings.ema_factor},
                                          "suggest": suggest, "override": override, "chunks": rows})
    png = loss_plots.lr_range(results, out / "lr_range.png")
    tb.add_image("lr_range", matplotlib.image.imread(str(png))[..., :3], 0, dataformats="HWC")
    table = ["| chunk | steepest descent | min-loss LR / 10 | lowest smoothed loss | diverged at |",
             "|---|---|---|---|---|"]
    table += [f"| {c.chunk} | {c.steepest:.2e} | {c.min_loss_lr / 10:.2e} | {c.min_loss:.4f} | "
              + (f"{c.diverged_at:.2e}" if c.diverged_at else "-") + " |" for c in results]
    tb.add_text("lr_range", "\n".join(table) + f"\n\napply: `{override}`", 0)
    tb.close()
    beta = settings.ema_factor
    print(f"smoothed loss: bias-corrected EMA, factor {beta:.3f} (a window of {1 / (1 - beta):.0f} steps of "
          f"{settings.steps})")
    print("\n".join(table))
    for c in results:
        if c.note:
            print(f"chunk {c.chunk}: {c.note}")
    print(f"\napply ({suggest}): python run.py <same overrides> {override}\nwrote {out}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="lr_range_test")
def main(cfg: DictConfig) -> None:
    try:
        range_test(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:  # before Hydra composes: our one line for a bad option or key, and path values quoted
        sys.argv[1:] = prepare_command_line(sys.argv[1:], "lr_range_test", ("data.path", "paths.log_dir"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
