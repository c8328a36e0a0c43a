"""Bad input fails early, in ``build``, with one sentence that names the value and says what to do."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from locallearn.config import PROJECT_ROOT
from locallearn.errors import ConfigError
from locallearn.runner import build, train


@pytest.fixture
def make_text_cfg(make_cfg):
    """``make_cfg`` with ``data=text``."""
    return lambda *overrides: make_cfg("data=text", *overrides)


@pytest.fixture
def files(tmp_path):
    """Paths for the text-data cases: a missing file, an empty one, one shorter than a window."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "empty.txt").write_text("", encoding="utf-8")
    (d / "short.txt").write_text("héllo", encoding="utf-8")
    return {"missing": d / "missing.txt", "empty": d / "empty.txt", "short": d / "short.txt", "tmp": tmp_path}


def check_message(err: BaseException, *must_contain: str):
    msg = str(err)
    assert type(err) is ConfigError
    assert "\n" not in msg, f"not a single line: {msg!r}"
    assert msg.strip() == msg and msg.endswith("."), msg
    assert not re.search(r"[.;!?]\s+[A-Z]", msg), f"more than one sentence: {msg!r}"
    for part in must_contain:
        assert part in msg, f"{part!r} not in {msg!r}"


# (overrides, strings the message must contain: the offending value first, then the advice)
SYNTHETIC_CASES = [
    pytest.param(["chunks=0"], ["chunks=0", "at least 1"], id="chunks=0"),
    pytest.param(["chunks=-1"], ["chunks=-1", "at least 1"], id="chunks=-1"),
    pytest.param(["chunks=5"], ["chunks=5", "model.n_layer=4", "chunks<=4"], id="chunks=5>n_layer"),
    pytest.param(["chunks=3", "boundaries=[3,2]"], ["boundaries=[3, 2]", "strictly increasing"],
                 id="boundaries-not-increasing"),
    pytest.param(["chunks=3", "boundaries=[2,2]"], ["boundaries=[2, 2]", "strictly increasing"],
                 id="boundaries-repeated"),
    pytest.param(["chunks=3", "boundaries=[0,2]"], ["boundaries=[0, 2]", "1..3"], id="boundary-0"),
    pytest.param(["chunks=3", "boundaries=[2,4]"], ["boundaries=[2, 4]", "1..3"], id="boundary-n_layer"),
    pytest.param(["chunks=3", "boundaries=[2]"], ["boundaries=[2]", "chunks=3", "pass chunks=2"],
                 id="boundaries-vs-chunks"),
    pytest.param(["chunks=2", "boundaries=[1,2,3]"], ["boundaries=[1, 2, 3]", "chunks=2", "pass chunks=4"],
                 id="boundaries-vs-chunks-more"),
    pytest.param(["data.block_size=32"], ["data.block_size=32", "model.block_size=16", "lower data.block_size"],
                 id="data.block_size>model"),
    pytest.param(["model.n_embd=15", "model.n_head=2"], ["model.n_embd=15", "model.n_head=2", "multiple"],
                 id="n_embd%n_head"),
    pytest.param(["schedule.warmup_steps=6"], ["schedule.warmup_steps=6", "trainer.max_steps=6", "lower the warmup"],
                 id="warmup=max_steps"),
    pytest.param(["schedule.warmup_steps=50"], ["schedule.warmup_steps=50", "trainer.max_steps=6"],
                 id="warmup>max_steps"),
    pytest.param(["ckpt_path={tmp}/nowhere/last.ckpt"], ["ckpt_path={tmp}/nowhere/last.ckpt", ".ckpt file"],
                 id="missing-ckpt"),
]


@pytest.mark.parametrize("overrides, expected", SYNTHETIC_CASES)
def test_bad_config_fails_in_build(make_cfg, files, overrides, expected):
    fill = {"tmp": files["tmp"]}
    cfg = make_cfg(*(o.format(**fill) for o in overrides))
    with pytest.raises(ConfigError) as info:
        build(cfg)
    check_message(info.value, *(e.format(**fill) for e in expected))


TEXT_CASES = [
    pytest.param(["data.path={missing}"], ["data.path={missing}", "does not exist", "pass an existing"],
                 id="missing-file"),
    pytest.param(["data.path={empty}"], ["data.path={empty}", "empty"], id="empty-file"),
    pytest.param(["data.path={short}"], ["data.path={short}", "block_size+1=17", "smaller block_size"],
                 id="shorter-than-a-window"),
    pytest.param([], ["data.path", "pass data.path="], id="no-path"),
]


@pytest.mark.parametrize("overrides, expected", TEXT_CASES)
def test_bad_text_data_fails_in_build(make_text_cfg, files, overrides, expected):
    cfg = make_text_cfg(*(o.format(**files) for o in overrides))
    with pytest.raises(ConfigError) as info:
        build(cfg)
    check_message(info.value, *(e.format(**files) for e in expected))


@pytest.mark.parametrize(
    "overrides, n_chunks",
    [
        (["chunks=4"], 4),
        (["chunks=1"], 1),
        (["chunks=3", "boundaries=[1,3]"], 3),
        (["chunks=null", "boundaries=[3]"], 2),
        (["schedule.warmup_steps=5"], 2),
        (["data.block_size=16"], 2),
        (["mode=sequential"], 2),
    ],
    ids=lambda o: ",".join(o) if isinstance(o, list) else str(o),
)
def test_valid_neighbours_build(make_cfg, overrides, n_chunks):
    """The values just inside each limit are accepted: the checks above are not over-eager."""
    run = build(make_cfg(*overrides))
    assert len(run.module.net.plan) == n_chunks


def test_valid_text_file_builds(make_text_cfg, files):
    path = files["tmp"] / "ok.txt"
    path.write_text("Für Elise — a small corpus. " * 20, encoding="utf-8")
    run = build(make_text_cfg(f"data.path={path}"))
    assert run.datamodule.vocab_size == len(set(path.read_text(encoding="utf-8")))


def test_train_stops_before_any_output(make_cfg):
    cfg = make_cfg("chunks=9")
    with pytest.raises(ConfigError, match="chunks=9"):
        train(cfg)
    out = Path(cfg.paths.output_dir)
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


def test_run_py_reports_one_line_and_exit_code_2(tmp_path):
    cmd = [sys.executable, "run.py", "model=tiny", "chunks=9", "trainer.enable_progress_bar=false",
           f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "chunks=9" in lines[0], lines[0]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)


def test_a_mode_set_as_a_plain_value_is_refused_as_it_would_not_select_its_strategy(make_cfg):
    from omegaconf import OmegaConf

    cfg = make_cfg("mode=joint")
    OmegaConf.update(cfg, "mode", "sequential")  # what `mode: sequential` in an experiment's body would do
    with pytest.raises(ConfigError) as info:
        build(cfg)
    check_message(info.value, "mode=sequential", "joint", "override /mode: sequential")


def test_an_unknown_mode_is_one_sentence_naming_the_modes():
    from locallearn.cli import check_group_choices

    with pytest.raises(ConfigError) as info:
        check_group_choices(["mode=bogus"])
    check_message(info.value, "mode=bogus", "joint, pipeline, sequential")


def test_the_mode_group_selects_its_strategy(make_cfg):
    from locallearn.pipeline.strategy import PipelineStrategy
    from locallearn.training.strategies import Sequential

    assert isinstance(build(make_cfg("mode=sequential")).module.strategy, Sequential)
    strategy = build(make_cfg("mode=pipeline", "pipeline.threads=1")).module.strategy
    assert isinstance(strategy, PipelineStrategy) and strategy.threads == 1
    assert build(make_cfg("mode=pipeline", "chunks=1")).module.strategy.name == "sequential"  # nothing to pipeline
