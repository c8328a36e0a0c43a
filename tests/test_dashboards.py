"""What a researcher watches: TensorBoard's HParams table and Custom Scalars charts as TensorBoard itself builds
them, the CSV logger and the other loggers, and the progress bar."""

import importlib.util
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from locallearn.analysis.sweeps import read_curve
from locallearn.checks.run import check_run
from locallearn.errors import ConfigError
from locallearn.runner import build, train
from locallearn.training.callbacks import StepProgressBar

# The choices that define a run (issue 18): every run logs them, so that any set of runs lines up in one table.
DEFINING = {"data", "data.path", "model", "chunks", "plan", "mode", "head", "objective", "method", "optim",
            "schedule", "lr", "steps", "seed"}


def hparams_table(logdir: Path):
    """TensorBoard's HParams experiment for ``logdir`` (its columns), computed by TensorBoard's own backend as
    the HParams tab computes it, and every session's hyperparameters."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, metadata

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    ctx = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider, multiplexer=mux))
    request = context.RequestContext()
    contents = ctx.hparams_metadata(request, "")
    experiment = ctx.experiment_from_metadata(request, "", True, contents,
                                              ctx.hparams_from_data_provider(request, "", limit=None))
    sessions = {run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG]).hparams
                for run, tags in contents.items() if metadata.SESSION_START_INFO_TAG in tags}
    columns = {h.name for h in experiment.hparam_infos}
    metrics = {m.name.tag for m in experiment.metric_infos}
    return columns, metrics, sessions


def chart_titles(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {c.title for cat in layout.category for c in cat.chart}


def test_runs_of_different_chunks_fill_one_hparams_table_with_every_chunk(make_cfg, tmp_path):
    for chunks in (1, 3):
        train(make_cfg(f"chunks={chunks}", "trainer.max_steps=3"))
    columns, metrics, sessions = hparams_table(tmp_path)
    assert DEFINING <= columns
    # every chunk either run has, and the last chunk's for comparing runs of different K; no training curves
    assert metrics == {"hparams/best_val_loss", "hparams/val_loss/last",
                       *(f"hparams/val_loss/chunk{k}" for k in (1, 2, 3))}
    by_chunks = {int(h["chunks"].number_value): h for h in sessions.values()}
    assert set(by_chunks) == {1, 3}
    assert by_chunks[3]["plan"].string_value == "0-1|2-2|3-3" and by_chunks[1]["plan"].string_value == "0-3"
    assert by_chunks[3]["data"].string_value == "synthetic" and by_chunks[3]["data.path"].string_value == "generated"
    assert by_chunks[3]["steps"].number_value == 3 and by_chunks[3]["model"].string_value == "tiny"


def test_a_resumed_run_keeps_one_hparams_session(make_cfg, tmp_path):
    first = make_cfg("trainer.max_steps=3")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg("trainer.max_steps=6", f"ckpt_path={last}")
    train(resumed)
    train(resumed)  # a second fit in the same directory (as resume= makes)
    _, _, sessions = hparams_table(Path(resumed.paths.output_dir))
    assert len(sessions) == 1 and len(list((Path(resumed.paths.output_dir) / "tb" / "hparams").iterdir())) == 1


def test_charts_are_only_those_of_metrics_the_run_logs(make_cfg):
    plain = make_cfg()
    train(plain)
    assert chart_titles(Path(plain.paths.output_dir)) == {"train loss", "val loss", "val bits per token",
                                                           "gradient norm", "learning rate"}
    cycled = make_cfg("schedule=cyclic", "schedule.cycle_steps=4", "schedule.cycle_momentum=true",
                      "optim.hypergrad_lr=1e-4")
    train(cycled)
    assert {"momentum", "hypergradient"} <= chart_titles(Path(cycled.paths.output_dir))


def test_the_csv_logger_alone_or_beside_tensorboard(make_cfg):
    alone = make_cfg("logger=csv")
    train(alone)
    out = Path(alone.paths.output_dir)
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "train/loss/chunk1", "train/loss/chunk2", "val/loss/chunk2", "train/lr/chunk1"} <= set(header)
    assert not (out / "tb").exists()
    assert len(read_curve(out, "val/loss/chunk2")) == 2  # the analyses read the CSV instead (validations at 3, 6)
    both = make_cfg("logger=[tensorboard,csv]")
    train(both)
    out = Path(both.paths.output_dir)
    assert (out / "csv" / "metrics.csv").is_file() and list((out / "tb").glob("events.out.tfevents.*"))
    assert read_curve(out, "val/loss/chunk2") == read_curve(Path(alone.paths.output_dir), "val/loss/chunk2")


@pytest.mark.parametrize("logger,package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("aim", "aim")])
def test_a_logger_whose_package_is_missing_is_refused_in_one_sentence(make_cfg, logger, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ConfigError, match=rf"^logger={logger} needs the {package} package, which is not installed; "
                                          rf"pip install {package} .*logger=csv\.$"):
        check_run(make_cfg(f"logger={logger}"))


def test_the_progress_bar_counts_steps_to_max_steps(make_cfg):
    run = build(make_cfg("trainer.enable_progress_bar=true"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    bar = run.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (6, 6)
    assert re.match("train step", bar.train_progress_bar.desc)
    quiet = build(make_cfg())  # enable_progress_bar=false leaves the configured bar out
    assert quiet.trainer.progress_bar_callback is None
