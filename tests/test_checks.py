"""Every option in conf/ has a checked range (locallearn/checks/tables.py), and every bad value is one sentence
before any work: table-driven over every key of every option file, plus the command-line cases (unknown keys,
analysis scripts)."""

import copy
import functools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from locallearn.checks import LR_RANGE, PROBING, RUN, Free, check_config
from locallearn.cli import check_overrides
from locallearn.config import CONF_DIR, PROJECT_ROOT
from locallearn.errors import ConfigError
from locallearn.runner import build

# Groups whose option files hold settings of the run config (experiment, variant and hparams_search only set
# values of these keys or Hydra's own; hydra and probe belong to Hydra and the probing config).
RUN_GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in
                    ("hydra", "probe", "experiment", "variant", "hparams_search"))


def _leaves(node, prefix=""):
    for key in node:
        value = node._get_node(key)
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value) and not any(str(k).startswith("_target_") for k in value):
            yield from _leaves(value, path + ".")
        elif OmegaConf.is_dict(value):  # an instantiated object: its own settings
            yield from (p for p in _leaves(value, path + ".") if not p.endswith(("._target_", "._partial_")))
        elif not str(key).startswith("_"):
            yield path


def _compose(config_name: str, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, list(overrides))


def run_options():
    """(group=option overrides that bring a key in, key) for every key of every option of every run group."""
    seen = {}
    for group in RUN_GROUPS:
        for option in sorted((CONF_DIR / group).rglob("*.yaml")):  # experiment=depth_benefit/induction too
            choice = [f"{group}={option.relative_to(CONF_DIR / group).with_suffix('').as_posix()}"]
            tests_data = [] if group == "data" else ["data=synthetic"]  # the data compose_config (TINY) gives
            for key in _leaves(_compose("config", [*tests_data, *choice])):
                seen.setdefault(key, choice)
    return seen


RUN_OPTIONS = run_options()


def test_every_option_of_every_config_has_a_spec():
    missing = sorted(k for k in RUN_OPTIONS if k not in RUN)
    assert not missing, f"options without a checked range in locallearn/checks/tables.py RUN: {missing}"
    for name, table in (("probing", PROBING), ("lr_range_test", LR_RANGE)):
        keys = [k for k in _leaves(_compose(name, ["runs=x"] if name == "probing" else []))
                if not k.startswith(tuple(f"{g}." for g in RUN_GROUPS)) and k not in RUN or k.startswith("lr_range.")]
        missing = sorted(k for k in keys if k not in table)
        assert not missing, f"options of conf/{name}.yaml without a spec: {missing}"
    assert not [k for k in RUN if k not in RUN_OPTIONS and k not in ("data.val_seed",)], "specs of no option"


def _override(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


RUN_CASES = [pytest.param(key, value, RUN_OPTIONS.get(key, []), id=f"{key}={_override(value)}")
             for key, spec in RUN.items() if key in RUN_OPTIONS for value in spec.bad_values()]


def check_message(msg: str, key: str):
    assert "\n" not in msg and msg.endswith(".") and msg == msg.strip(), msg
    assert not re.search(r"[.;!?]\s+[A-Z]", msg), f"more than one sentence: {msg!r}"
    assert msg.startswith(f"{key}=") or f" {key}=" in msg or msg.startswith(f"{key} "), (key, msg)


@functools.cache
def _run_config(choice: tuple, out: str):
    return compose_config(Path(out), *choice)


@pytest.mark.parametrize("key, value, choice", RUN_CASES)
def test_every_bad_value_of_every_option_is_one_sentence(tmp_path_factory, key, value, choice):
    # composed once per option file, then the value set as the command line would give it (nan, text, null ...)
    cfg = copy.deepcopy(_run_config(tuple(choice), str(tmp_path_factory.getbasetemp() / "checks")))
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as info:
        check_config(cfg, RUN)
    check_message(str(info.value), key)


@pytest.mark.parametrize("override", ["optim.lr=nan", "seed=abc", "trainer.max_steps=0", "model.dropout=1",
                                      "objective=span", "data.batch_size=1.5", "optim.betas=[0.9]"])
def test_bad_values_from_the_command_line_stop_build_before_any_work(tmp_path, override):
    extra = ["objective.max_span=0"] if override == "objective=span" else []
    cfg = compose_config(tmp_path / "run", override, *extra)
    with pytest.raises(ConfigError) as info:
        build(cfg)
    check_message(str(info.value), (extra or [override])[0].split("=")[0])
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("table, name", [(PROBING, "probing"), (LR_RANGE, "lr_range_test")])
def test_every_bad_value_of_the_analysis_options_is_refused(tmp_path, table, name):
    for key, spec in table.items():
        if isinstance(spec, Free) or key.startswith("paths."):
            continue
        base = [f"runs={tmp_path}"] if name == "probing" else []
        probe = ["probe=mlp"] if key in ("probe.alpha", "probe.hidden") else []
        for value in spec.bad_values():
            cfg = _compose(name, [*probe, *base, f"{key}={_override(value)}"])
            with pytest.raises(ConfigError) as info:
                check_config(cfg, table)
            check_message(str(info.value), key)


def test_good_values_pass(tmp_path):
    for key, spec in RUN.items():
        if hasattr(spec, "example") and key in RUN_OPTIONS:
            check_config(OmegaConf.create({}), {key: spec})  # absent keys are skipped
            assert spec.ok(spec.example()), key
    build(compose_config(tmp_path / "run"))  # the defaults themselves


@pytest.mark.parametrize("arg, expected", [
    ("chunk=4", "chunk=4 names no setting of the config; did you mean chunks=4"),
    ("+chunk=4", "+chunk=4 names no setting of the config; did you mean chunks=4"),
    ("optim.weight_decy=0.1", "optim.weight_decy=0.1 names no setting of the config; did you mean "
                              "optim.weight_decay=0.1"),
    ("schedule.cycle_steps=10", "schedule.cycle_steps=10 is not a setting of schedule=cosine; it belongs to "
                                "schedule=cyclic"),
    ("+trainer.not_an_arg=1", "+trainer.not_an_arg=1 is not an argument of lightning.pytorch.Trainer"),
    ("~chunks", "~chunks would remove a setting the run needs"),
    ("+chunks=3", "+chunks=3 adds a setting the config already has"),
], ids=lambda x: x if "=" in x or "~" in x else None)
def test_an_override_that_names_no_setting_gets_the_nearest_one(arg, expected):
    with pytest.raises(ConfigError) as info:
        check_overrides([*TINY, arg])
    assert str(info.value).startswith(expected)
    check_message(str(info.value), arg.split("=")[0])


def test_added_callbacks_loggers_and_trainer_arguments_are_still_accepted():
    check_overrides(["model=tiny", "+trainer.limit_val_batches=1", "~callbacks.tensorboard_layout", "chunks=1,2",
                     "+callbacks.crash._target_=conftest.CrashAt", "schedule=cyclic", "schedule.cycle_steps=4",
                     "hydra.verbose=true", "hydra/launcher=submitit_local", "callbacks.summary.path=/tmp/s.json",
                     "paths.output_dir=/tmp/out", "--cfg", "job"])


@pytest.mark.parametrize("arg, expected", [
    ("chunk=4", "error: chunk=4 names no setting of the config; did you mean chunks=4"),  # before Hydra composes
    ("optim.lr=-1", "error: optim.lr=-1 must be a finite number above 0"),  # inside the Hydra job
])
def test_run_py_answers_a_bad_command_line_with_one_line_and_exit_code_2(tmp_path, arg, expected):
    cmd = [sys.executable, "run.py", *TINY, arg, f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # nothing written, not even an empty run directory


def test_compare_on_a_directory_without_runs_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "analysis/compare.py", str(tmp_path / "empty")], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "holds no run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "empty").iterdir()) == []  # no blank report written


def test_every_checked_path_is_checked_for_existence_and_kind(tmp_path):
    a_file = tmp_path / "f.ckpt"
    a_file.write_text("x")
    for key, value in (("ckpt_path", tmp_path / "missing.ckpt"), ("ckpt_path", tmp_path), ("resume", a_file)):
        with pytest.raises(ConfigError, match=re.escape(f"{key}={value} must be an existing")):
            check_config(OmegaConf.create({key: str(value)}), RUN)
    with pytest.raises(ConfigError, match="runs is not set"):
        check_config(_compose("probing"), PROBING)
