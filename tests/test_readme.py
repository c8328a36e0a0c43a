"""Every command the README and the docs/ pages show runs: each is taken from them as written, made tiny (fewer
steps, a tiny model, one seed, the test's own log dir, placeholders filled in with real runs) and run. A command the
test cannot run here says why in ``NOT_RUN``; a command that is neither run nor listed fails the test."""

import importlib.util
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA, TINY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_text import write_treebank

from locallearn.config import CONF_DIR, PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
PAGES = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]  # the README, then every docs/ page

# Commands that this test does not run, and why (each is exercised elsewhere or cannot run on a CPU test box).
NOT_RUN = {
    "python3 -m venv": "the setup commands are what .ci/run does on a fresh clone",
    "bash .ci/run": "CI itself",
    "python -m pytest -m slow": "the slow tests, left out of the default run by design",
    "python analysis/bench.py": "a fresh process per configuration (minutes); its arguments are parsed here and "
                                "tests/test_pipeline.py runs it on the tiny model (-m slow)",
    "python analysis/probe_bench.py": "three whole probe analyses; tests/test_probing.py runs it on tiny runs",
    "bash analysis/gpu_check.sh": "needs a GPU; tests/test_gpu_readiness.py checks on the CPU what can be checked",
    "python -m locallearn": "the installed entry point: tests/test_install.py runs it from a wheel in a fresh venv",
    "python analysis/sweep_timing.py": "three sweeps of six jobs (minutes); tests/test_sweeps.py runs it on tiny "
                                       "sweeps (-m slow)",
}

# Overrides that change how a run is shown or spread over processes, not what it trains: a command that differs
# from an earlier one only by these (or by the order of its overrides) is that command again, and is not rerun.
PRESENTATION = ("trainer.enable_progress_bar=", "hydra.launcher.n_jobs=")

# Real processes per chunk or per data-parallel rank cost seconds each; tests/test_pipeline.py (torchrun) and
# tests/test_rundir.py, tests/test_pipeline.py (trainer=ddp) run them. Here their commands are composed and checked.
COMPOSED_ONLY = {
    "torchrun": "tests/test_pipeline.py::test_torchrun_starts_one_process_per_chunk",
    "trainer=ddp": "tests/test_pipeline.py::test_ddp_with_two_processes_matches_one_process_with_the_combined_batch",
}


def readme_commands() -> list[str]:
    """Every command line of the README's and the docs' bash blocks and inline code, in order, comments stripped."""
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    commands = [c for c in commands if re.match(r"(python3? |torchrun |tensorboard |bash )", c)]
    return list(dict.fromkeys(commands))


def same_run(command: str) -> tuple:
    """What a command runs, whatever the order of its overrides and its presentation-only overrides."""
    argv = shlex.split(command)
    script = [a for a in argv if not re.fullmatch(r"[\w./+~-]+=.*", a) or a.startswith("--")]
    overrides = sorted(a for a in argv if a not in script and not a.startswith(PRESENTATION))
    return tuple(script), tuple(overrides)


def _data_target(args: list[str]) -> str:
    """The data module a run.py command line composes to (its synthetic-corpus sizes apply only there)."""
    choices = [a for a in args if "=" in a and "/" not in a.split("=")[0] and "." not in a.split("=")[0]
               and not a.startswith(("+", "-")) and (CONF_DIR / a.split("=")[0]).is_dir()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [c if "=[" in c else c.split(",")[0] for c in choices])  # logger=[a,b] as it is
    return str(cfg.data._target_), str(cfg.schedule._target_)


def tiny(args: list[str]) -> list[str]:
    """Tiny overrides for a run.py (or lr_range_test.py) command line: the test's TINY, less what its data set or
    schedule lacks, one seed in sweeps, and two Optuna trials."""
    data, schedule = _data_target(args)
    keep = [o for o in TINY if not o.startswith(("data=", "chunks="))  # the README's commands run on its defaults
            and (data.endswith("SyntheticDataModule") or not o.startswith("data.n_"))
            and (schedule.endswith("warmup_cosine") or not o.startswith("schedule.warmup"))]
    if data.rsplit(".", 1)[-1] in ("InductionDataModule", "MQARDataModule", "KHopDataModule"):
        keep += ["data.block_size=24", "model.block_size=24"]  # the tasks' own example length, in model=tiny
    out = [re.sub(r"^seed=([^,]+),.*", r"seed=\1", a) for a in args]
    if any(a.startswith("experiment=") for a in args) and "-m" in args:
        out.append("hydra.sweeper.params.seed=0")
    if any(a.startswith("experiment=depth_benefit") for a in args) and "-m" in args:
        out.append("variant=end_to_end,shallow1,chunked")  # both references and a K=4 run (wins over the recipe)
    if any(a.startswith("hparams_search=") for a in args):
        out.append("hydra.sweeper.n_trials=2")
    return out + keep


class Workspace:
    """The test's log dir, its runs and sweeps, and how README placeholders map onto them."""

    def __init__(self, root: Path):
        self.root, self.logs = root, root / "logs"
        self.corpus = root / "corpus.txt"
        self.corpus.write_text("To be, or not to be, that is the question.\n" * 300, encoding="utf-8")

    def sweeps(self, marker: str) -> list[Path]:
        return sorted(p for p in (self.logs / "multiruns").glob("*") if marker in p.name)

    def job(self, sweep: Path, chunks: int) -> Path:
        """The sweep's first job of ``chunks`` chunks (read from its summary: a variant may set them)."""
        return next(j for j in sorted(sweep.iterdir()) if j.is_dir() and (j / "summary.json").is_file()
                    and json.loads((j / "summary.json").read_text()).get("chunks") == chunks)

    def fill(self, command: str) -> str:
        sweep = lambda marker: self.sweeps(marker)[0]  # noqa: E731
        subs = {  # placeholder -> what it stands for, looked up only when the command has it
            "logs/multiruns/<sweep dir>": lambda: sweep("experiment=chunk_sweep"),
            "logs/multiruns/<date>_<time>_experiment=chunk_sweep": lambda: sweep("experiment=chunk_sweep"),
            "<local run>": lambda: self.job(sweep("experiment=chunk_sweep"), 4),
            "<end-to-end run>": lambda: self.job(sweep("experiment=chunk_sweep"), 1),
            "logs/multiruns/<that sweep>": lambda: sweep("data=ewt"),
            "logs/runs/<run dir>": lambda: sorted((self.logs / "runs").iterdir())[0],
            "<end-to-end run dir>": lambda: self.job(sweep("data=ewt"), 1),
            "<run dir>": lambda: self.job(sweep("data=ewt"), 4),
            "<synthetic run or sweep>": lambda: sweep("chunks=1,2,4"),
            "<induction sweep>": lambda: sweep("depth_benefit-induction"),
            "logs/multiruns/<date>_<time>_experiment=depth_benefit-induction": lambda: sweep("depth_benefit-induction"),
            "logs/multiruns/<date>_<time>_experiment=depth_benefit-shakespeare":
                lambda: sweep("depth_benefit-shakespeare"),
            "<Shakespeare K=4 run>": lambda: self.job(sweep("depth_benefit-shakespeare"), 4),
            "<its Shakespeare end-to-end run>": lambda: self.job(sweep("depth_benefit-shakespeare"), 1),
            "<K=4 run>": lambda: self.job(sweep("depth_benefit-induction"), 4),
            "<its end-to-end run>": lambda: self.job(sweep("depth_benefit-induction"), 1),
            "/path/to/corpus.txt": lambda: self.corpus,
            "/path/to/train.txt": lambda: self.corpus, "/path/to/valid.txt": lambda: self.corpus,
            "/path/to/test.txt": lambda: self.corpus, "/path/to/other.txt": lambda: self.corpus,
            "<text run dir>": lambda: self.job(sweep("data=ewt"), 4), "<sweep on text>": lambda: sweep("data=ewt"),
            "runs=<sweep>": lambda: "runs=" + str(sweep("data=ewt")),
            "/path/to/UD_English-GUM": lambda: write_treebank(self.root / "UD_Toy"),
            "<partition>": lambda: "debug", " <overrides>": lambda: "", "chunks=K": lambda: "chunks=2",
        }
        for placeholder, value in subs.items():
            if placeholder in command:
                value = value()
                command = command.replace(placeholder, shlex.quote(str(value)) if value != "" else "")
        assert "<" not in command, f"a README placeholder this test cannot fill: {command}"
        return command


def _run_here(script: str, args: list[str]) -> None:
    """``python <script> <args>`` inside this process (what costs seconds per command is starting Python and
    importing torch and Lightning, not the tiny run): its ``__main__`` block runs as from the command line."""
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [script, *args]
    try:
        os.chdir(PROJECT_ROOT)
        runpy.run_path(str(PROJECT_ROOT / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"python {script} {shlex.join(args)} exited with {e.code}"
    finally:
        sys.argv = argv
        os.chdir(cwd)
        GlobalHydra.instance().clear()


def _run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_command(command: str, ws: Workspace, seen: set) -> str:
    """Run one README command, tiny, unless its tiny form (``seen``) already ran; return what was run."""
    argv = shlex.split(ws.fill(command))
    if argv[0] == "tensorboard":
        argv = [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(ws.logs), "--inspect"]
    elif argv[0] == "torchrun":  # COMPOSED_ONLY: the run.py command line torchrun would start, composed
        args = argv[argv.index("run.py") + 1:]
        argv = [sys.executable, "run.py", *tiny(args), f"paths.log_dir={ws.logs}", "--cfg", "all"]
    elif argv[:2] == ["python", "run.py"] and any(a.startswith("resume=") for a in argv):
        argv = [sys.executable, "run.py", *argv[2:], "trainer.max_steps=8"]  # the run's own overrides are tiny
    elif argv[:2] == ["python", "run.py"]:
        args = argv[2:]
        if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:  # Ray is an optional extra
            args = [a for a in args if a != "hydra/launcher=ray"]  # the same sweep, basic launcher
        if ("trainer=gpu" in args or "model=base" in args or "hydra/launcher=slurm" in args  # no GPU, no cluster
                or any(marker in args for marker in COMPOSED_ONLY)):
            args = [a for a in args if a != "-m"] + ["--cfg", "all"]  # the checks and the composed config only
        argv = [sys.executable, "run.py", *tiny(args), f"paths.log_dir={ws.logs}"]
    elif argv[:2] in (["python", "analysis/lr_range_test.py"], ["python", "analysis/probe.py"]):
        args = argv[2:]
        extra = tiny(args) + ["lr_range.steps=12"] if "lr_range" in argv[1] else ["max_train_words=400",
                                                                                 "max_eval_words=200", "cka_words=64"]
        argv = [sys.executable, argv[1], *args, *extra, f"paths.log_dir={ws.logs}"]
    elif argv[:2] == ["python", "analysis/activation_memory.py"]:
        argv = [sys.executable, argv[1], *argv[2:], "--model", "tiny", "--out", str(ws.root / "memory.json")]
    elif argv[0] == "python" and argv[1].startswith("analysis/"):
        argv = [sys.executable, *argv[1:]]
    else:
        raise AssertionError(f"no way to run this README command: {command}")
    tiny_form = tuple(sorted(a for a in argv if a != "seed=0" and not a.startswith("paths.log_dir=")))  # 0: default
    if tiny_form in seen:  # e.g. a sweep over seeds, which runs one seed here, beside the same sweep without them
        return f"(ran already) {shlex.join(argv)}"
    seen.add(tiny_form)
    separate = "tensorboard" in argv[0]  # a server
    if separate or argv[0] != sys.executable:
        _run(argv, timeout=600)
    else:
        _run_here(argv[1], argv[2:])
    return shlex.join(argv)


def _order(command: str) -> int:
    """Runs and sweeps first (the analysis commands read them), then the rest in README order."""
    return 0 if command.startswith(("python run.py", "torchrun")) else 1


@pytest.mark.shared_data
def test_every_command_in_the_readme_runs(tmp_path):
    commands = readme_commands()
    assert any("resume=" in c for c in commands) and len(commands) > 20
    ws = Workspace(tmp_path)
    skipped = {c: why for c in commands for start, why in NOT_RUN.items() if c.startswith(start)}
    runs = {}
    for c in commands:
        if c not in skipped:
            runs.setdefault(same_run(c), c)
    to_run = sorted(runs.values(), key=_order)
    ran = []
    seen = set()
    for c in to_run:
        t0 = time.perf_counter()
        ran.append(run_command(c, ws, seen))
        print(f"{time.perf_counter() - t0:6.1f} s  {ran[-1]}")
    assert len(ran) == len(to_run)
    # the one resumed run went on in its own directory, with its own overrides
    resumed = sorted((ws.logs / "runs").iterdir())[0]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "finished"
    # bench: the README's arguments parse
    spec = importlib.util.spec_from_file_location("bench", PROJECT_ROOT / "analysis" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for command in (c for c in skipped if c.startswith("python analysis/bench.py")):
        bench.parser().parse_args(shlex.split(command)[2:])
    assert SHARED_DATA.is_dir()
