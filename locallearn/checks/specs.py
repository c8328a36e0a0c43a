"""Specs of one option's valid values, and :func:`check_config`, which applies a table of them to a config.

Every spec says what it accepts (``ok``) and how to say so (``describe``, ``hint``); a refused value becomes
one sentence: ``key=value must be ...; hint.``
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from locallearn.errors import ConfigError

_ABSENT = object()


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Number:
    """A finite number in [lo, hi] (bounds optional; ``lo_open``/``hi_open`` exclude them), whole if ``integer``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    null: bool = False  # None allowed (the hint says what it means)
    hint: str = ""

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            rng = f" in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            rng = f" {'above' if self.lo_open else 'of at least'} {_num(self.lo)}"
        elif self.hi is not None:
            rng = f" {'below' if self.hi_open else 'of at most'} {_num(self.hi)}"
        else:
            rng = ""
        return kind + rng + (" or null" if self.null else "")

    def ok(self, value) -> bool:
        if value is None:
            return self.null
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):  # 4.0 too: torch and range() want an int
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def example(self):
        """A value this spec accepts."""
        if self.lo is None:
            x = 0 if self.hi is None or self.hi > 0 else self.hi - 1
        elif not self.lo_open:
            x = self.lo
        else:
            x = self.lo + (min(1, (self.hi - self.lo) / 2) if self.hi is not None else 1)
        return int(x) if self.integer else x

    def bad_values(self) -> list:
        """Values this spec must refuse (what the tests feed it)."""
        out = [float("nan"), float("inf"), "abc", True]
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        if self.integer:
            whole = self.lo if self.lo is not None else 0
            out += [whole + 1.5, float(whole + 1)]  # a fraction, and a whole number written as a float
        if not self.null:
            out.append(None)
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Numbers:
    """A list of numbers, each within ``each`` (of ``length`` items if given), or null if allowed."""

    each: Number
    length: int | None = None
    null: bool = False
    hint: str = ""

    def describe(self) -> str:
        n = f"{self.length} " if self.length else ""
        return f"a list of {n}numbers, each {self.each.describe()}" + (", or null" if self.null else "")

    def ok(self, value) -> bool:
        if value is None:
            return self.null
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
            return False
        return all(self.each.ok(v) for v in value) and (len(value) > 0 or self.length == 0)

    def bad_values(self) -> list:
        n = self.length or 2
        wrong = [b for b in self.each.bad_values() if isinstance(b, (int, float)) and not isinstance(b, bool)]
        out = ["abc", *([b] * n for b in wrong[:3])]
        if self.length:
            out.append([self.each.example()] * (self.length + 1))
        return out + ([] if self.null else [None])


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (a ``None`` among them allows null)."""

    options: tuple
    hint: str = ""

    def describe(self) -> str:
        return "one of " + ", ".join(_show(o) for o in self.options)

    def ok(self, value) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)

    def bad_values(self) -> list:
        return ["bogus", 3] + ([None] if None not in self.options else [])


@dataclass(frozen=True)
class Flag:
    """true or false."""

    hint: str = ""

    def describe(self) -> str:
        return "true or false"

    def ok(self, value) -> bool:
        return isinstance(value, bool)

    def bad_values(self) -> list:
        return ["maybe", 2, None]


@dataclass(frozen=True)
class Devices:
    """Lightning's ``devices``: a count >= 1, ``auto``, or a list of device indices."""

    hint: str = "e.g. trainer.devices=1, trainer.devices=auto or trainer.devices=[0,1]"

    def describe(self) -> str:
        return "a whole number of at least 1, auto, or a list of device indices"

    def ok(self, value) -> bool:
        if value == "auto" or (Number(1, integer=True).ok(value)):
            return True
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(Number(0, integer=True).ok(v) for v in value)

    def bad_values(self) -> list:
        return [0, -1, "many", 1.5, [], None]


@dataclass(frozen=True)
class Existing:
    """A path that exists and is a ``kind`` ("file" or "dir"), or null if allowed."""

    kind: str
    null: bool = True
    hint: str = ""

    def describe(self) -> str:
        return f"an existing {'file' if self.kind == 'file' else 'directory'}" + (" or null" if self.null else "")

    def ok(self, value) -> bool:
        if value is None:
            return self.null
        path = Path(str(value)).expanduser()
        return path.is_file() if self.kind == "file" else path.is_dir()

    def bad_values(self) -> list:
        return ["/nonexistent/locallearn-check", "/" if self.kind == "file" else "/etc/hostname"]


@dataclass(frozen=True)
class Free:
    """Not range-checked: free text (a metric name, a file-name pattern) or a value the config derives itself
    (an interpolation such as ``${paths.output_dir}``); ``why`` says which."""

    why: str

    def ok(self, value) -> bool:
        return True

    def bad_values(self) -> list:
        return []


Spec = Number | Numbers | Choice | Flag | Devices | Existing | Free

def _value(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_config(cfg: DictConfig, table: Mapping[str, Spec]) -> None:
    """Raise a one-sentence :class:`ConfigError` for the first value of ``cfg`` that its spec in ``table`` refuses
    (keys absent from ``cfg``, e.g. another schedule's settings, are skipped)."""
    for key, spec in table.items():
        if isinstance(spec, Free):  # nothing to check: not even resolved (some interpolate Hydra's runtime)
            continue
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if OmegaConf.is_dict(node) and name in node.keys() and OmegaConf.is_missing(node, name):
            hint = f"; {spec.hint}" if getattr(spec, "hint", "") else ""
            raise ConfigError(f"{key} is not set (???) and has no default{hint}, e.g. {key}=<value>.")
        value = _value(cfg, key)
        if value is _ABSENT or spec.ok(value):
            continue
        hint = f"; {spec.hint}" if spec.hint else ""
        raise ConfigError(f"{key}={_show(value)} must be {spec.describe()}{hint}.")
