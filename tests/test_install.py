"""The package as a user installs it: the built wheel in a fresh virtual environment, trained from another directory.

The wheel must carry the Hydra configs and the entry points, and a run must write under the directory it is started
in (or ``LOCALLEARN_LOGS``), never under the install location. The fresh environment borrows this one's
dependencies (a ``.pth`` line) rather than downloading them: the wheel itself is what is under test.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from locallearn.config import PROJECT_ROOT

RUN = ["model=tiny", "data=synthetic", "data.n_train_tokens=20000", "data.n_val_tokens=4000", "trainer.max_steps=4",
       "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def test_the_wheel_trains_from_any_directory(tmp_path):
    # Built from a copy of the sources: a build writes build/ and *.egg-info beside them, never into the checkout.
    source = tmp_path / "source"
    shutil.copytree(PROJECT_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".whl", "logs", "build", "*.egg-info", "__pycache__", "*.json"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]  # offline if it can
    clean = {k: v for k, v in os.environ.items() if k not in ("LOCALLEARN_LOGS", "PYTHONPATH")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, env=clean)
    (wheel,) = (tmp_path / "dist").glob("locallearn-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, lightning, hydra ...
    # --ignore-installed: this environment's own (editable) locallearn is visible through the borrowed path
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, env=clean)
    installed = site / "locallearn"
    assert (installed / "conf" / "config.yaml").is_file() and (installed / "conf" / "experiment").is_dir()
    before = sorted(p for p in installed.rglob("*") if "__pycache__" not in p.parts)

    work = tmp_path / "work"
    work.mkdir()
    env = clean
    train = subprocess.run([str(venv / "bin" / "locallearn-train"), *RUN], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    (run_dir,) = (work / "logs" / "runs").iterdir()  # under the directory it ran in
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert str(installed) in subprocess.run([str(py), "-c", "import locallearn; print(locallearn.__file__)"], cwd=work,
                                            env=env, capture_output=True, text=True).stdout  # the wheel's, not ours

    module = subprocess.run([str(py), "-m", "locallearn", *RUN, "chunks=1"], cwd=work,
                            env={**env, "LOCALLEARN_LOGS": str(tmp_path / "elsewhere")}, capture_output=True,
                            text=True, timeout=300)
    assert module.returncode == 0, module.stderr[-3000:]
    assert len(list((tmp_path / "elsewhere" / "runs").iterdir())) == 1
    assert sorted(p for p in installed.rglob("*") if "__pycache__" not in p.parts) == before  # nothing written there
