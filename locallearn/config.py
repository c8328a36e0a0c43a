"""OmegaConf resolvers used by ``conf/`` (registered when :mod:`locallearn` is imported).

* ``${ll.cwd:}``: the directory the command runs in: ``paths.log_dir`` (``./logs`` unless ``LOCALLEARN_LOGS``)
  and ``paths.data_dir`` are found from it, never from where the package is installed (an installed package has
  no project folder; a second checkout must not write into the first). ``${ll.root:}``, the checkout's folder,
  stays for the saved configs of runs made before.
* ``${ll.tag:${hydra.job.override_dirname}}``: a run's overrides as a folder-name fragment
  ("defaults" when there are none), so that run and sweep directories say what they hold.
* ``${ll.corpus:<data.name>,<data.path>}``: a text corpus's name as a prefix of run directory names
  ("tinyshakespeare_"; empty for generated data), so that runs on two corpora never look alike.
* ``${ll.treebank:<task>,<treebank>}``: the same for a probe directory and its treebank ("en_gum_").
* ``${ll.sweep_tag:${hydra.job.override_dirname}}``: the same for a whole multirun, from the
  sweep's own overrides ("chunks=1,2,4"). Hydra re-resolves ``hydra.sweep.dir`` inside every job,
  where ``override_dirname`` is that job's ("chunks=1"). This resolver is cached, and OmegaConf keys
  its cache by the argument's unresolved text; the launcher resolves it first, Hydra copies resolver
  caches into every job (as it does for ``${now:}``), so all jobs of a sweep share one directory.

It also says what a run's config *is*: the keys that define a run (:data:`IDENTITY`, which a resumed run or a
checkpoint must share), how two configs differ, and :func:`instantiate`.
"""

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import OmegaConf

from locallearn.errors import ConfigError
from locallearn.names import corpus_name, treebank_name

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # a checkout's folder (run.py, tests/, analysis/)
CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package; conf/ in a checkout links here


def _tag(overrides: str | None) -> str:
    tag = (overrides or "defaults").replace("/", "-").replace(" ", "")
    if len(tag) > 120:  # stay well inside file-name limits; the hash keeps long tags distinct
        tag = tag[:100] + "_" + hashlib.md5(tag.encode()).hexdigest()[:8]
    return tag


def _corpus(name, path) -> str:
    """A text corpus's name as a directory-name prefix ("tinyshakespeare_"); "" for generated data (no path)."""
    return _tag(str(name or corpus_name(path))) + "_" if path else ""


def _treebank(task, treebank) -> str:
    """A probe directory's treebank prefix ("en_gum_") for a UD task (upos, deprel); "" for the others."""
    return _tag(treebank_name(treebank)) + "_" if task in ("upos", "deprel") else ""


def register_resolvers():
    OmegaConf.register_new_resolver("ll.cwd", lambda: os.getcwd(), replace=True)
    OmegaConf.register_new_resolver("ll.root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("ll.tag", _tag, replace=True)
    OmegaConf.register_new_resolver("ll.sweep_tag", _tag, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("ll.corpus", _corpus, replace=True)
    OmegaConf.register_new_resolver("ll.treebank", _treebank, replace=True)


def quote(value: str) -> str:
    """``value`` quoted for Hydra's override grammar (run directories carry "=" and "," in their names)."""
    return f"'{value}'" if "'" not in value else f'"{value}"'


# Where the classes and functions a run's config names lived before the package was grouped into
# sub-packages (issue 15): a run saved before still loads, is probed and resumes with its own config.
LEGACY_TARGETS = {
    "locallearn.heads.": "locallearn.model.heads.",
    "locallearn.objectives.": "locallearn.model.objectives.",
    "locallearn.schedules.": "locallearn.training.schedules.",
    "locallearn.execution.": "locallearn.training.strategies.",
    "locallearn.callbacks.": "locallearn.training.callbacks.",
    "locallearn.checkpoint.": "locallearn.training.checkpoint.",
    "locallearn.ddp.": "locallearn.training.ddp.",
}


# Overrides an older version took, as they read now: the chunk plan's keys were a group (chunking=greedy,
# chunking.boundaries=[1,3]) before they were all top-level (issue 15).
RENAMED = {"chunking=greedy": "variant=greedy", "chunking=chunked": "", "chunking.boundaries=": "boundaries="}


def upgrade_override(override: str) -> str:
    """``override`` as it reads now ("" when it is the default); unchanged unless :data:`RENAMED` has it."""
    for old, new in RENAMED.items():
        if override.lstrip("+") == old or (old.endswith("=") and override.lstrip("+").startswith(old)):
            return new + override.lstrip("+")[len(old):] if old.endswith("=") else new
    return override


def upgrade_targets(node):
    """``node`` (a plain container) with every ``_target_`` of :data:`LEGACY_TARGETS` renamed to its place now."""
    if isinstance(node, Mapping):
        return {k: _current(v) if k == "_target_" else upgrade_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [upgrade_targets(v) for v in node]
    return node


def _current(target):
    for old, new in LEGACY_TARGETS.items():
        if isinstance(target, str) and target.startswith(old):
            return new + target[len(old):]
    return target


def load_saved(path, resolve: bool = False):
    """A run's saved ``config.yaml`` as a DictConfig, as this version names things (:func:`upgrade_targets`)."""
    return OmegaConf.create(upgrade_config(OmegaConf.to_container(OmegaConf.load(path), resolve=resolve)))


def upgrade_config(saved: dict) -> dict:
    """A run config an older version saved (``config.yaml``, a checkpoint's), as this version names things."""
    saved = dict(saved)
    if isinstance(saved.get("chunking"), Mapping):  # the chunk plan's group before its keys were top-level
        saved["boundaries"] = saved.pop("chunking").get("boundaries")
    saved.setdefault("interlock", 1)  # before n-wise interlocking, every run was interlock=1
    saved.setdefault("method", {"_target_": "locallearn.training.methods.Local"})  # and before methods, local
    data = saved.get("data")
    if isinstance(data, Mapping) and str(data.get("_target_", "")).endswith(("TextDataModule", "EWTDataModule")):
        # text was read by character, from one file (or EWT's files)
        data = dict(data)
        for key in ("tokenizer", "vocab_size", "tokenizer_file", "test_path", "val_path"):
            if key != "val_path" or data["_target_"].endswith("TextDataModule"):
                data.setdefault(key, "char" if key == "tokenizer" else None)
        saved["data"] = data
    return upgrade_targets(saved)


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


IDENTITY = ("model", "data", "chunks", "boundaries", "overlap", "interlock", "method", "head", "objective", "seed",
            "optim._target_", "schedule._target_")
# Data settings that name or find things without changing what a run trains on: its corpus's label, the saved
# tokenizer it reads back, the test file only evaluate.py reads.
LABELS = ("data.name", "data.tokenizer_file", "data.test_path")


def under(key: str, names) -> bool:
    """Whether ``key`` is one of ``names`` or inside one of them ("switch.at" is under "switch")."""
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "/") for n in names)


def flatten(node, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: leaf}."""
    if isinstance(node, Mapping):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def differences(have: Mapping, want: Mapping, keys=IDENTITY, ignore=()) -> list[str]:
    """``key=value (the run has x)`` for every setting under ``keys`` (groups or dotted keys; not in ``ignore``)
    where ``want`` differs from ``have``."""
    a = {k: v for k, v in flatten(have).items() if under(k, keys)}
    b = {k: v for k, v in flatten(want).items() if under(k, keys)}
    out = []
    for key in sorted(set(a) | set(b)):
        if not under(key, (*ignore, *LABELS)) and a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}={b.get(key, '<unset>')} (the run has {a.get(key, '<unset>')})")
    return out


def summarize(diffs: list[str], n: int = 4) -> str:
    return ", ".join(diffs[:n]) + (f" and {len(diffs) - n} more" if len(diffs) > n else "")


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate``, letting our one-sentence :class:`ConfigError` through unwrapped."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
