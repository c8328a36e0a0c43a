"""The command line before Hydra sees it: every script's overrides are quoted, checked (one sentence for an
unknown key or option) and, for ``run.py``, ``resume=<run dir>`` is expanded (:func:`prepare_command_line`).
"""

import difflib
import re
from pathlib import Path

from omegaconf import OmegaConf

from locallearn.config import CONF_DIR, quote, upgrade_override
from locallearn.errors import ConfigError
from locallearn.rundir import expand_resume


def check_renamed(overrides: list[str]) -> None:
    """Raise a one-sentence :class:`ConfigError` for an override an older version took (``chunking=greedy``)."""
    for arg in overrides:
        now = upgrade_override(arg)
        if now != arg:
            instead = f"write {now}" if now else "drop it (it is the default)"
            raise ConfigError(f"{arg} is an older name: {instead}; the chunk plan's keys are top-level now "
                              f"(chunks, boundaries, overlap).")


def check_group_choices(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise a one-sentence :class:`ConfigError` for a command-line ``group=option`` naming no option.

    Hydra would report it too, but as a multi-line message with its search path; this check runs
    first, on the plain ``group=a,b`` forms (sweep functions such as ``choice(...)`` are left to Hydra).
    """
    for arg in overrides:
        m = re.fullmatch(r"\+{0,2}(\w+)=\[?([^()\[\]{}$*]*)\]?", arg)  # a list selects several: logger=[a,b]
        if not m or not (conf_dir / m.group(1)).is_dir():
            continue
        group, values = m.groups()
        # Options in subfolders are named by their path: experiment=depth_benefit/induction.
        options = sorted(p.relative_to(conf_dir / group).with_suffix("").as_posix()
                         for p in (conf_dir / group).rglob("*.yaml"))
        for value in values.split(","):
            if value not in options and value != "null":
                hint = f"choose one of {', '.join(options)}" if options else "it has no options yet"
                raise ConfigError(f"{group}={value} is not an option of the {group} group; {hint} "
                                  f"(the files in conf/{group}/).")


# An override: optional +, ++ or ~, a key, and (except for ~) "=" and a value.
_OVERRIDE = re.compile(r"(\+\+|\+|~)?([\w.\-]+)(=.*)?", re.S)
# Keys a `+key=` may add: callbacks and loggers (instantiated by their _target_) and Trainer arguments.
_OPEN = ("callbacks.", "logger.", "trainer.")


def _paths(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config, inner nodes included."""
    out = []
    for key in node:
        path = f"{prefix}{key}"
        out.append(path)
        child = node._get_node(key)
        if OmegaConf.is_dict(child):
            out += _paths(child, path + ".")
    return out


def _nearest(key: str, known: list[str]) -> str | None:
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in known if k.rsplit(".", 1)[-1] == last]
    if len(same_name) == 1:
        return same_name[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _other_options(key: str, cfg, conf_dir: Path) -> list[str]:
    """Options of ``key``'s group whose file has ``key`` (schedule.cycle_steps -> [cyclic])."""
    group, _, rest = key.partition(".")
    if not rest or not (conf_dir / group).is_dir():
        return []
    found = []
    for f in sorted((conf_dir / group).rglob("*.yaml")):
        node = OmegaConf.load(f)
        if OmegaConf.select(node, rest, default=None) is not None or rest in node:
            found.append(f.relative_to(conf_dir / group).with_suffix("").as_posix())
    return found


def check_overrides(argv: list[str], config_name: str = "config", conf_dir: Path = CONF_DIR) -> None:
    """Raise a one-sentence :class:`ConfigError` for an override that names no setting of the composed config.

    Hydra answers ``chunk=4`` with a hint to use ``+chunk=4``, which then trains with a stray key nothing
    reads; here both get the nearest valid key. ``+key=`` is kept for what may be added: callbacks, loggers
    and Trainer arguments. Group choices (``model=tiny``) are checked by :func:`check_group_choices`.
    """
    args = [(m.group(1) or "", m.group(2), m.group(3) or "", a) for a in split_flags(argv)[1]
            if (m := _OVERRIDE.fullmatch(a))]
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    settings = [x for x in args if x[1].split(".")[0] not in ("hydra",) and x[1] not in groups]
    if not settings:
        return
    # a sweep's first option (model=tiny,small -> model=tiny); a list of options (logger=[tensorboard,csv]) as it is
    choices = [f"{key}={value[1:] if value.startswith('=[') else value[1:].split(',')[0]}"
               for prefix, key, value, _ in args if key in groups and value]
    cfg = _compose_quietly(config_name, choices, conf_dir)
    if cfg is None:  # let Hydra report whatever stops the composition
        return
    every = set(_paths(cfg))  # read without resolving: some defaults interpolate Hydra's runtime
    known = sorted(k for k in every if not k.startswith("hydra") and not any(p.startswith("_") for p in k.split(".")))
    for prefix, key, value, arg in settings:
        exists = key in every
        if prefix == "~" and exists and not key.startswith(_OPEN):
            raise ConfigError(f"{arg} would remove a setting the run needs; set it instead ({key}=...), or remove "
                              f"only callbacks, loggers or Trainer arguments with ~.")
        if exists and prefix != "+":
            continue
        if prefix in ("+", "++") and not exists and key.startswith(_OPEN):
            if key.startswith("trainer.") and not _trainer_argument(key.split(".")[1]):
                raise ConfigError(f"{arg} is not an argument of lightning.pytorch.Trainer; see its documentation "
                                  f"for the arguments, or drop the override.")
            continue
        if exists:  # "+key" for a key the config has
            raise ConfigError(f"{arg} adds a setting the config already has; drop the + ({key}{value}).")
        others = _other_options(key, cfg, conf_dir)
        if others:
            group = key.split(".")[0]
            chosen = cfg.hydra.runtime.choices.get(group)
            raise ConfigError(f"{arg} is not a setting of {group}={chosen}; it belongs to "
                              f"{', '.join(f'{group}={o}' for o in others)}, so choose that option too or drop it.")
        near = _nearest(key, known)
        hint = f"did you mean {near}{value}" if near else "no setting has a similar name"
        raise ConfigError(f"{arg} names no setting of the config; {hint} (python {_script(config_name)} --cfg job "
                          f"lists every setting).")



def _script(config_name: str) -> str:
    return {"config": "run.py", "probing": "analysis/probe.py"}.get(config_name, f"analysis/{config_name}.py")


def _trainer_argument(name: str) -> bool:
    import inspect

    import lightning as L

    return name in inspect.signature(L.Trainer.__init__).parameters


def _compose_quietly(config_name: str, overrides: list[str], conf_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()


# Hydra's command-line flags that take a value (``--cfg job``); ``--info`` takes one of _INFO optionally.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """A Hydra command line -> (its flags with their values, its overrides)."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            flags.append(arg)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and "=" not in arg and (arg in _FLAGS_WITH_VALUE or
                                                       (arg in ("--info", "-i") and nxt in _INFO)):
                flags.append(nxt)
                i += 1
        i += 1
    return flags, overrides


def prepare_command_line(argv: list[str], config_name: str = "config", path_keys=(), resume: bool = False):
    """What every Hydra script of the package does with its command line before Hydra sees it: quote path values,
    check group options and keys (one sentence for a bad one), and for run.py expand ``resume=<run dir>``."""
    flags, overrides = split_flags(argv)
    overrides = quote_values(overrides, path_keys)
    check_renamed(overrides)
    check_group_choices(overrides)
    if resume:  # resume=<run dir>: that run's overrides, checkpoint and directory
        overrides = expand_resume(overrides, multirun=bool({"-m", "--multirun"} & set(flags)))
    check_overrides(overrides, config_name)
    return flags + overrides


def composed_config(argv: list[str], path_keys=()):
    """The run config a ``run.py`` command line composes (``resume=<run dir>`` expanded), or None if it composes
    none: how a process that Hydra does not start (a torchrun worker) reads its settings."""
    overrides = quote_values(split_flags(argv)[1], path_keys)
    try:
        overrides = expand_resume(overrides)
    except ConfigError:  # already expanded: a process started with a prepared command line
        pass
    return _compose_quietly("config", overrides, CONF_DIR)


def quote_values(argv: list[str], keys) -> list[str]:
    """Quote the values of path-like ``keys`` where Hydra's override grammar would parse them."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        is_list = value.startswith("[") and value.endswith("]")  # a list of paths: Hydra's grammar reads it
        if eq and key.lstrip("+") in keys and value and value[0] not in "'\"" and not is_list and \
                re.search(r"[=,\s\[\]{}()]", value):
            arg = f"{key}={quote(value)}"
        out.append(arg)
    return out
