"""The checked range of every option in ``conf/``, tested before any work starts.

The rule: every numeric option has a range (and says whether it must be whole and whether null is allowed),
every option with a fixed set of values names them, every flag is a boolean, and every path is checked for
existence and kind. :func:`check_config` applies a table of these specs to a composed config and raises a
one-sentence :class:`ConfigError` (``key=value must be ...; hint.``) for the first bad value. ``build()``
calls it with :data:`RUN` before reading any data; ``analysis/probe.py`` and ``analysis/lr_range_test.py``
with their own tables. Checks that need several values at once (chunks against the model's depth, a
warmup against the run's length ...) stay with the concept they belong to (the chunk plan, the schedules).

tests/test_checks.py walks every option file of ``conf/``, requires a spec here for every key it finds, and
feeds every spec its own bad values.
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

PROB = Number(0, 1)
SEED = Number(0, 2**32 - 1, integer=True, hint="a seed is a whole number such as 0")
POS_INT = Number(1, integer=True)
DERIVED = Free("derived from paths.output_dir")

# The run config (conf/config.yaml and its groups); run.py, tests and analysis/lr_range_test.py compose it.
RUN: dict[str, Spec] = {
    # top level
    "chunks": Number(1, integer=True, null=True, hint="chunks=1 is end-to-end backprop; null takes the count from "
                     "chunking.boundaries"),
    "overlap": Number(0, integer=True, hint="it counts blocks of the previous chunk, e.g. overlap=1"),
    "mode": Choice(("joint", "sequential", "pipeline")),
    "seed": SEED,
    "grad_clip": Number(0, lo_open=True, null=True, hint="it is the max gradient norm per chunk (of the whole model "
                        "in global steps); null disables clipping"),
    "loss_weights": Numbers(Number(0), null=True, hint="one weight per chunk, e.g. loss_weights=[0.5,1]"),
    "switch.at": Number(0, 1, lo_open=True, null=True, hint="a fraction of trainer.max_steps; null stays local"),
    "switch.aux_weight": Number(0),
    "switch.ewc_lambda": Number(0, hint="0 turns EWC off"),
    "switch.fisher": Choice((True, "true", "empirical"), hint="true samples the targets from the model (the Fisher "
                            "information), empirical takes the data's"),
    "switch.fisher_batches": POS_INT,
    "ckpt_path": Existing("file", hint="pass the path of a .ckpt file, e.g. <run dir>/checkpoints/last.ckpt"),
    "resume": Existing("dir", hint="pass the directory of the run to continue"),
    "pipeline.threads": Number(1, integer=True, null=True, hint="null shares the cores among the chunks"),
    "pipeline.backend": Choice(("gloo", "nccl")),
    # objective (before model: model.causal follows objective.causal)
    "objective.causal": Flag(),
    "objective.mask_prob": Number(0, 1, lo_open=True, hi_open=True),
    "objective.geometric_p": Number(0, 1, lo_open=True),
    "objective.max_span": POS_INT,
    # model
    "model.n_layer": POS_INT, "model.n_head": POS_INT, "model.n_embd": POS_INT, "model.block_size": POS_INT,
    "model.dropout": Number(0, 1, hi_open=True),
    "model.bias": Flag(),
    "model.causal": Flag(),
    "model.pos": Choice(("learned", "rope")),
    # data
    "data.batch_size": POS_INT, "data.block_size": POS_INT, "data.val_windows": POS_INT,
    "data.seed": SEED, "data.val_seed": SEED, "data.corpus_seed": SEED,
    "data.n_train_tokens": POS_INT, "data.n_val_tokens": POS_INT,
    "data.val_fraction": Number(0, 1, lo_open=True, hi_open=True),
    "data.path": Free("checked by the data set itself: a text file (data=text) or the EWT folder (data=ewt)"),
    # tasks (data=mqar|induction|khop); how their sizes fit one window is checked by the task itself
    "data.task_seed": SEED, "data.n_train": POS_INT,
    "data.n_pairs": POS_INT, "data.n_queries": POS_INT, "data.n_keys": POS_INT, "data.n_values": POS_INT,
    "data.n_symbols": POS_INT, "data.segment": Number(2, integer=True, hint="the first token of a repeat is no "
                                                       "answer, so a segment needs two"),
    "data.hops": POS_INT, "data.n_chains": POS_INT, "data.n_nodes": POS_INT,
    # chunking
    "chunking.boundaries": Numbers(Number(integer=True), null=True, hint="boundaries are block indices, "
                                   "e.g. chunking.boundaries=[1,3] (the chunk plan checks their range)"),
    "chunking.greedy": Flag(),
    # optimizer and schedule
    "optim.lr": Number(0, lo_open=True, hint="it is a learning rate, e.g. optim.lr=1e-3"),
    "optim.betas": Numbers(Number(0, 1, hi_open=True), length=2, hint="e.g. optim.betas=[0.9,0.99]"),
    "optim.weight_decay": Number(0),
    "optim.chunk_lr": Numbers(Number(0, lo_open=True), null=True, hint="one learning rate per chunk"),
    "optim.hypergrad_lr": Number(0, lo_open=True, null=True, hint="a hypergradient step size (the paper uses about "
                                 "1e-7 with Adam), or null to keep the schedule's learning rates"),
    "schedule.warmup_steps": Number(0, integer=True),
    "schedule.min_lr_ratio": PROB,
    "schedule.mode": Choice(("triangular", "triangular2", "exp_range")),
    "schedule.cycle_steps": Number(2, integer=True, hint="a cycle rises for half its steps and falls for the other "
                                   "half"),
    "schedule.base_lr_ratio": Number(0, 1, lo_open=True, hi_open=True, hint="the cycle's lowest LR as a fraction "
                                     "of its peak"),
    "schedule.gamma": Number(0, 1, lo_open=True, hint="mode=exp_range shrinks the amplitude as gamma^step"),
    "schedule.cycle_momentum": Flag(),
    "schedule.base_momentum": Number(0, 1, hi_open=True),
    "schedule.max_momentum": Number(0, 1, hi_open=True),
    "schedule.pct_start": Number(0, 1, lo_open=True, hi_open=True, hint="the fraction of the run the LR rises"),
    "schedule.div_factor": Number(1, lo_open=True, hint="the first LR is lr / div_factor"),
    "schedule.final_div_factor": Number(1, hint="the last LR is lr / (div_factor x final_div_factor)"),
    "schedule.anneal_strategy": Choice(("cos", "linear")),
    "schedule.three_phase": Flag(),
    # trainer
    "trainer.max_steps": Number(1, integer=True, hint="the run's length in steps, e.g. trainer.max_steps=2000"),
    "trainer.val_check_interval": Number(1, integer=True, hint="validate every N steps (and at the last)"),
    "trainer.check_val_every_n_epoch": Choice((None,), hint="the training stream is endless: count steps with "
                                              "trainer.val_check_interval"),
    "trainer.log_every_n_steps": POS_INT,
    "trainer.num_sanity_val_steps": Number(-1, integer=True),
    "trainer.enable_progress_bar": Flag(), "trainer.enable_model_summary": Flag(),
    "trainer.enable_autolog_hparams": Flag(),
    "trainer.accelerator": Choice(("auto", "cpu", "gpu", "cuda", "mps", "tpu")),
    "trainer.devices": Devices(),
    "trainer.num_nodes": POS_INT,
    "trainer.precision": Choice(("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true",
                                 "bf16-true", "64-true", "64", 64)),
    "trainer.strategy.start_method": Choice(("popen", "spawn", "fork", "forkserver")),
    "trainer.default_root_dir": DERIVED,
    "trainer.plugins": Free("the atomic checkpoint writer; replace only with another CheckpointIO"),
    # callbacks and logger
    "callbacks.model_checkpoint.dirpath": DERIVED,
    "callbacks.model_checkpoint.filename": Free("a file-name pattern"),
    "callbacks.model_checkpoint.monitor": Free("a metric name such as val/loss"),
    "callbacks.model_checkpoint.mode": Choice(("min", "max")),
    "callbacks.model_checkpoint.save_top_k": Number(-1, integer=True),
    "callbacks.model_checkpoint.save_last": Flag(),
    "callbacks.model_checkpoint.auto_insert_metric_name": Flag(),
    "callbacks.diagnostics.path": DERIVED,
    "callbacks.diagnostics.stop_on_divergence": Flag(),
    "callbacks.diagnostics.fit_curves": Flag(),
    "callbacks.diagnostics.predict_step": Number(1, integer=True, null=True, hint="null = 10 x trainer.max_steps"),
    "callbacks.diagnostics.diverge_ratio": Number(1, lo_open=True),
    "callbacks.diagnostics.diverge_window": POS_INT,
    "callbacks.diagnostics.spike_z": Number(0, lo_open=True),
    "callbacks.diagnostics.spike_window": Number(10, integer=True),
    "callbacks.diagnostics.plateau_evals": Number(2, integer=True),
    "callbacks.diagnostics.plateau_rel": Number(0, 1, lo_open=True, hi_open=True),
    "callbacks.diagnostics.underfit_margin": Number(0, 1, hi_open=True),
    "callbacks.diagnostics.rise_window": Number(2, integer=True),
    "callbacks.diagnostics.rise_rel": Number(0, lo_open=True),
    "callbacks.summary.path": DERIVED,
    "logger.tensorboard.save_dir": DERIVED,
    "logger.tensorboard.name": Free("a folder name"),
    "logger.tensorboard.version": Free("a folder name"),
    "logger.tensorboard.default_hp_metric": Flag(),
    # paths
    "paths.root_dir": Free("the project folder, found by the package"),
    "paths.data_dir": Free("checked where it is read, through data.path or ewt_path"),
    "paths.log_dir": Free("checked by the run-directory callback: it must be writable"),
    "paths.output_dir": Free("set by Hydra"),
}


_PATHS = {"paths.root_dir": RUN["paths.root_dir"], "paths.data_dir": RUN["paths.data_dir"],
          "paths.log_dir": RUN["paths.log_dir"], "paths.output_dir": RUN["paths.output_dir"]}

# analysis/probe.py (conf/probing.yaml and conf/probe/)
PROBING: dict[str, Spec] = {
    "runs": Existing("dir", null=False, hint="pass a run directory or a multirun directory"),
    "task": Choice(("upos", "deprel", "agreement", "role", "depth", "category",  # corpora; then the tasks' labels
                    "prev_token", "seen_before", "pair_key", "recall", *(f"hop{j}" for j in range(1, 10))),
                   hint="; whether it fits the runs' data is checked when they are read"),
    "control": Flag(), "baselines": Flag(),
    "cka": Choice(("unbiased", "linear", None), hint="null skips CKA"),
    "reference": Existing("dir", hint="pass an end-to-end run directory, or null for each run's same-seed one"),
    "cka_words": Number(4, integer=True), "cka_permutations": POS_INT,
    "ewt_path": Free("checked for its three .conllu files when an EWT task reads it"),
    "max_train_words": Number(1, integer=True, null=True), "max_eval_words": Number(1, integer=True, null=True),
    "batch_size": POS_INT,
    "device": Free("a torch device such as cpu or cuda:0"),
    "seed": SEED,
    "cache_dir": Free("checked to lie outside every probed run"),
    "probe.C": Numbers(Number(0, lo_open=True), hint="the inverse L2 strengths probe-dev chooses from"),
    "probe.alpha": Numbers(Number(0, lo_open=True), hint="the L2 strengths probe-dev chooses from"),
    "probe.max_iter": POS_INT, "probe.hidden": POS_INT,
    **_PATHS,
}

# analysis/lr_range_test.py: its lr_range block (the rest is the run config, checked by RUN)
LR_RANGE: dict[str, Spec] = {
    "lr_range.lr_min": Number(0, lo_open=True), "lr_range.lr_max": Number(0, lo_open=True),
    "lr_range.steps": Number(12, integer=True, hint="100 to 300 is usual"),
    "lr_range.smooth": Number(0, 1, hi_open=True, null=True, hint="the EMA factor; null takes a window of 5% of "
                              "the sweep"),
    "lr_range.diverge": Number(1, lo_open=True, hint="a multiple of the lowest smoothed loss"),
    "lr_range.suggest": Choice(("min_loss", "steepest")),
    "lr_range.device": Free("a torch device such as cpu or cuda"),
}


def _value(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_config(cfg: DictConfig, table: Mapping[str, Spec] = RUN) -> None:
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
