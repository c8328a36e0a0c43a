"""The callback that watches every chunk's loss curves while a run trains (the analysis is
:mod:`locallearn.analysis.diagnose`)."""

import logging
import math
from dataclasses import asdict, fields
from pathlib import Path

import lightning as L

from locallearn.analysis import loss_plots
from locallearn.analysis.curve_fit import fit_curves
from locallearn.analysis.detectors import DivergenceWatch, Thresholds, check_thresholds, warmup_end
from locallearn.analysis.diagnose import Context, Finding, diagnose, divergence_finding, report
from locallearn.atomic import write_json
from locallearn.errors import ConfigError, TrainingDiverged
from locallearn.training.callbacks.tensorboard import tensorboard_logger
from locallearn.training.checkpoint import last_checkpoint

log = logging.getLogger("locallearn.analysis.diagnose")


class Diagnostics(L.Callback):
    """Watches every chunk's train and val loss (see :mod:`locallearn.analysis.diagnose`).

    A chunk whose loss diverges stops the run at once with :class:`TrainingDiverged` (before the next
    checkpoint could save diverged weights, so ``last.ckpt`` is the last good state). At the end of fit
    (or when fit fails) the findings go to the console, to TensorBoard as text and to
    ``diagnostics.json``, and each chunk's val curve gets a power-law fit (``curve_fit.png``, and
    ``curve_fit`` in summary.json), extrapolated to ``predict_step`` only where the chunk's recorded LR
    stayed constant under the fitted points and the data identify the fit (see
    :mod:`locallearn.analysis.curve_fit`). Steps are numbered as on TensorBoard's x-axis.

    Args:
        path: where ``diagnostics.json`` goes (the figure goes next to it).
        stop_on_divergence: stop the run when a chunk diverges (else it is only reported).
        fit_curves: fit L(t) = a t^-b + c to each chunk's val curve at the end of fit.
        predict_step: the step the fits predict the loss at (fits that may be extrapolated); null = 10 x
            trainer.max_steps.
        **thresholds: the fields of :class:`locallearn.analysis.diagnose.Thresholds`.
    """

    def __init__(self, path, stop_on_divergence: bool = True, fit_curves: bool = True,
                 predict_step: int | None = None, **thresholds):
        unknown = set(thresholds) - {f.name for f in fields(Thresholds)}
        if unknown:
            raise ConfigError(f"callbacks.diagnostics.{sorted(unknown)[0]} is not a diagnostics setting; use one of "
                              f"{', '.join(f.name for f in fields(Thresholds))}.")
        self.th = Thresholds(**thresholds)
        check_thresholds(self.th)
        self.path = Path(path)
        self.stop_on_divergence, self.fit_curves, self.predict_step = stop_on_divergence, fit_curves, predict_step
        self.train: dict[int, list[list]] = {}  # chunk -> [steps, losses]
        self.val: dict[int, list[list]] = {}
        self.lr: dict[int, list[list]] = {}
        self.watch = DivergenceWatch(self.th.diverge_ratio, self.th.diverge_window)
        self.diverged: Finding | None = None
        self._ctx = Context()
        self._results: tuple | None = None  # (history size, findings, fits) of the last analysis

    # -- recording ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        datamodule = trainer.datamodule
        self._ctx = Context(
            unigram_entropy=datamodule.unigram_entropy() if hasattr(datamodule, "unigram_entropy") else None,
            loss_terms=getattr(pl_module.objective, "loss_terms", 1), max_steps=trainer.max_steps,
            loss_weights=list(pl_module.loss_weights))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._read_records(trainer, pl_module)

    def _read_records(self, trainer, pl_module):
        diverged = None
        for k, step, loss, lr in pl_module.take_train_records() if hasattr(pl_module, "take_train_records") else []:
            for history, value in ((self.train, loss), (self.lr, lr)):
                steps, values = history.setdefault(k, [[], []])
                steps.append(step)
                values.append(float(value))
            evidence = self.watch.check(k, loss)
            if evidence and diverged is None:
                diverged = (k, step, evidence)
        if trainer.world_size > 1:  # every data-parallel rank stops, or none
            if trainer.strategy.reduce_boolean_decision(diverged is not None, all=False) and diverged is None:
                diverged = (1, trainer.global_step - 1, "a loss diverged on another data-parallel rank (see its log)")
        if diverged and self.stop_on_divergence:
            self._diverge(trainer, *diverged, "train")

    def on_validation_end(self, trainer, pl_module):
        # Runs before ModelCheckpoint's own on_validation_end (Lightning puts checkpoint callbacks
        # last), so a non-finite val loss stops the run before diverged weights are saved.
        if trainer.sanity_checking or pl_module.final_val is None:
            return
        self._read_records(trainer, pl_module)  # all of them, before a checkpoint can save diverged weights
        step = trainer.global_step
        for k, value in enumerate(pl_module.final_val, start=1):
            steps, values = self.val.setdefault(k, [[], []])
            if steps and steps[-1] == step:  # validated twice at one step (the run's last step)
                values[-1] = value
                continue
            steps.append(step)
            values.append(value)
            if not math.isfinite(value) and self.stop_on_divergence:
                self._diverge(trainer, k, step, f"val loss is {value}", "val")

    def _diverge(self, trainer, chunk: int, step: int, evidence: str, split: str):
        self.diverged = divergence_finding(chunk, step, evidence, self._context(), split)
        # The step last.ckpt really holds (Checkpoints.last_step): the latest validation before this one.
        ckpt = last_checkpoint(trainer)
        kept = (f"; the last good checkpoint is {ckpt.last_model_path} (step {ckpt.last_step})" if ckpt
                else "; no checkpoint was saved before it")
        raise TrainingDiverged(f"chunk {chunk} diverged at step {step}: {evidence}; {self.diverged.cause}, so "
                               f"{self.diverged.remedy}{kept}.")

    # -- analysis -----------------------------------------------------------------------------------
    def _context(self) -> Context:
        ctx = self._ctx
        ctx.lr = {k: (v[0], v[1]) for k, v in self.lr.items()}
        ctx.warmup_steps = warmup_end(ctx.lr)
        return ctx

    def results(self) -> tuple[list[Finding], dict]:
        """(findings, fits): fits maps chunk -> PowerLaw, or to the message saying why it could not fit."""
        size = sum(len(v[0]) for v in self.train.values()) + sum(len(v[0]) for v in self.val.values())
        if self._results is None or self._results[0] != size:
            train = {k: (v[0], v[1]) for k, v in self.train.items()}
            val = {k: (v[0], v[1]) for k, v in self.val.items()}
            findings = diagnose(train, val, self._context(), self.th)
            if self.diverged is not None:
                findings = [self.diverged] + [f for f in findings if f.kind != "underfitting"]
            fits = fit_curves(val, self._context().lr) if self.fit_curves else {}  # the LR decides extrapolation
            self._results = (size, findings, fits)
        return self._results[1], self._results[2]

    def _predict_at(self, trainer) -> int | None:
        return self.predict_step or (10 * trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)

    def summary_fields(self, trainer) -> dict:
        """What summary.json gets: the findings by kind and each chunk's curve fit."""
        findings, fits = self.results()
        at = self._predict_at(trainer)
        out = {"diagnostics": {"findings": len(findings),
                               "by_kind": {kind: sorted({c for f in findings if f.kind == kind
                                                         for c in (f.chunks or [f.chunk])})
                                           for kind in sorted({f.kind for f in findings})},
                               "diverged": self.diverged.to_dict() if self.diverged else None}}
        if self.fit_curves:
            out["curve_fit"] = {f"chunk{k}": (fit.to_dict(at) if not isinstance(fit, str) else {"error": fit})
                                for k, fit in sorted(fits.items())}
        return out

    def _report(self, trainer, status: str):
        if trainer.global_rank != 0:
            return
        findings, fits = self.results()
        at = self._predict_at(trainer)
        write_json(self.path, {"status": status, "thresholds": asdict(self.th),
                               "findings": [f.to_dict() for f in findings], **self.summary_fields(trainer)})
        text = report(findings)
        fit_lines = fit_table(fits, at)
        if findings:
            log.warning("diagnostics: %d finding%s (%s):\n%s", len(findings), "s" * (len(findings) != 1), self.path,
                        text)
        else:
            log.info("diagnostics: %s", text)
        if fit_lines:
            log.info("power-law fits of the val curves, L(t) = a t^-b + c:\n%s", "\n".join(fit_lines))
        curves = {k: (v[0], v[1]) for k, v in self.val.items() if v[0]}
        if self.fit_curves and curves:
            loss_plots.curve_fits(curves, {k: f for k, f in fits.items() if not isinstance(f, str)},
                                  self.path.with_name("curve_fit.png"), at)
        tb = tensorboard_logger(trainer)
        if tb is not None:
            tb.experiment.add_text("diagnostics", text + ("\n\n" + "\n".join(fit_lines) if fit_lines else ""),
                                   trainer.global_step)
            tb.experiment.flush()

    def on_fit_end(self, trainer, pl_module):
        self._read_records(trainer, pl_module)  # mode=pipeline: the last chunks' last steps arrive at the end
        self._report(trainer, "finished")

    def on_exception(self, trainer, pl_module, exception):
        status = "diverged" if isinstance(exception, TrainingDiverged) else f"failed: {type(exception).__name__}"
        try:
            self._report(trainer, status)
        except OSError as e:  # the disk that failed the run may fail this too: the first error is the one to report
            log.warning("could not write %s: %s", self.path, e)

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val, "lr": self.lr, "watch": self.watch.state_dict()}

    def load_state_dict(self, state_dict: dict):
        for name in ("train", "val", "lr"):
            setattr(self, name, {int(k): v for k, v in state_dict.get(name, {}).items()})
        self.watch.load_state_dict(state_dict.get("watch", {}))


def fit_table(fits: dict, predict_at: int | None) -> list[str]:
    """Markdown rows of each chunk's fit (or why it could not be fitted)."""
    if not fits:
        return []
    rows = [f"| chunk | a | b | c (asymptote) | predicted at step {predict_at} | rmse |", "|---|---|---|---|---|---|"]
    for k, fit in sorted(fits.items()):
        if isinstance(fit, str):
            rows.append(f"| {k} | not fitted: {fit} | | | | |")
            continue
        rows.append(f"| {k} | {fit.markdown_cells(predict_at)}")
    return rows
