"""Per-chunk loss diagnostics: what went wrong with which chunk, when, and what to try.

The detectors (:mod:`locallearn.analysis.detectors`) are plain functions over loss streams, so they can be
tested on synthetic curves and run on finished runs; :class:`locallearn.training.callbacks.diagnostics.Diagnostics`
feeds them during training, and :func:`diagnose` turns what they find into findings.

* divergence (online): a non-finite loss, or a smoothed loss far above the chunk's starting loss;
* spikes: a robust z-score (median and MAD over a moving window of earlier steps) above a threshold;
  those chunk 1 shows together with later chunks are the batch's, reported once as batch spikes;
* rising loss: the train loss's median over windows of steps climbs above its best earlier window
  and stays there (an optimizer that undoes its own progress: mostly a learning rate too high);
* plateau: the best val loss improved by less than a relative threshold over N evaluations;
* overfitting: val loss rising for N evaluations while the train loss falls;
* underfitting: after warmup, a train loss not clearly below the unigram entropy of the data
  (what a model that ignores context gets).

Each :class:`Finding` names its chunk (from 1), its step range, the numbers behind it, a likely
cause and a remedy. Causes use what the run knows: the chunk's learning rate against the run's
peak, whether the previous chunk shows the same problem at the same time (a chunk trains on the
previous chunk's output) or the first chunk does too (then the batch did it: chunk 1's input is the
data), and the schedule.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from locallearn.analysis.detectors import (
    Curve,
    Thresholds,
    find_overfitting,
    find_plateaus,
    find_rising,
    find_spikes,
    underfitting,
)


@dataclass
class Context:
    """What the run knows beyond the losses, used to name causes."""

    lr: dict[int, Curve] = field(default_factory=dict)  # per chunk (from 1): (steps, learning rate)
    unigram_entropy: float | None = None  # nats: the no-context baseline of one cross-entropy term
    loss_terms: int = 1  # cross-entropies a chunk's loss sums (span masking: MLM + SBO = 2)
    warmup_steps: int = 0
    max_steps: int | None = None
    loss_weights: list[float] | None = None


@dataclass
class Finding:
    kind: str  # divergence | spike | batch spike | rising loss | plateau | overfitting | underfitting
    chunk: int  # from 1 (a batch spike: 1, the first of its chunks)
    first_step: int
    last_step: int
    evidence: str
    cause: str
    remedy: str
    split: str = "train"  # the loss stream it was found in: train or val
    chunks: list[int] | None = None  # every chunk it covers, when several (a batch spike)

    def line(self) -> str:
        steps = f"step {self.first_step}" if self.first_step == self.last_step else \
            f"steps {self.first_step}-{self.last_step}"
        who = f"chunks {', '.join(map(str, self.chunks))}" if self.chunks else f"chunk {self.chunk}"
        return (f"{who}, {steps}: {self.kind} ({self.split}): {self.evidence}. "
                f"Likely cause: {self.cause}. Try: {self.remedy}.")

    def to_dict(self) -> dict:
        return asdict(self)


# -- causes and remedies ------------------------------------------------------------------------------

def _lr_at(ctx: Context, chunk: int, step: int) -> float | None:
    if chunk not in ctx.lr or not ctx.lr[chunk][0]:
        return None
    steps, lrs = ctx.lr[chunk]
    i = int(np.searchsorted(np.asarray(steps), step, side="right")) - 1
    return float(lrs[max(i, 0)])


def _peak_lr(ctx: Context, chunk: int) -> float | None:
    return max(ctx.lr[chunk][1]) if chunk in ctx.lr and ctx.lr[chunk][1] else None


def _improved_after(curve: Curve, step: int, rel: float) -> bool:
    """Whether the best val loss after ``step`` is lower than the best up to it by more than ``rel``."""
    steps, values = np.asarray(curve[0]), np.asarray(curve[1], dtype=float)
    before, after = values[steps <= step], values[steps > step]
    return bool(len(after) and len(before) and np.nanmin(after) < (1 - rel) * np.nanmin(before))


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def lr_too_high(chunk: int, lr: float | None) -> tuple[str, str]:
    at = f" (lr {lr:.2e})" if lr is not None else ""
    return (f"learning rate likely too high for chunk {chunk}{at}",
            f"lower chunk {chunk}'s learning rate (optim.lr, or optim.chunk_lr per chunk; "
            f"analysis/lr_range_test.py suggests one), lengthen schedule.warmup_steps or lower grad_clip")


def batch_spikes(spikes: dict[int, list]) -> tuple[Finding | None, dict[int, list]]:
    """(the batch-spike finding or None, each chunk's own spikes) from per-chunk spikes (chunk -> [(step,
    value, z)], as :func:`find_spikes` gives). A spike of chunk 1 that later chunks show too, within one step,
    is the batch's: chunk 1's input is the data itself, so nothing upstream handed it on. All of them make one
    finding; what is left of each chunk's spikes is its own."""
    own = {k: list(found) for k, found in spikes.items()}
    events = []  # (step, {chunk: z})
    for step, _, z in spikes.get(1, []):
        near = {k: [p for p in own[k] if abs(p[0] - step) <= 1] for k in own if k > 1}
        near = {k: ps for k, ps in near.items() if ps}
        if near:
            events.append((step, {1: z} | {k: max(p[2] for p in ps) for k, ps in near.items()}))
            own[1] = [p for p in own[1] if p[0] != step]
            for k, ps in near.items():
                own[k] = [p for p in own[k] if p not in ps]
    if not events:
        return None, own
    plural = "s" * (len(events) > 1)
    shown = "; ".join(f"{s} (chunks {', '.join(map(str, zs))}: z={', '.join(f'{z:.0f}' for z in zs.values())})"
                      for s, zs in events[:8]) + (" ..." if len(events) > 8 else "")
    return Finding("batch spike", 1, events[0][0], events[-1][0],
                   f"{len(events)} spike{plural} of chunk 1 and later chunks together, at step{plural} {shown}",
                   "an unusual batch: chunk 1, whose input is the data itself, spiked with the chunks after it",
                   "nothing if they stay rare; if they recur, look at those batches of the data, or lower every "
                   "chunk's learning rate or grad_clip", chunks=sorted({k for _, zs in events for k in zs})), own


def diagnose(train: dict[int, Curve], val: dict[int, Curve], ctx: Context | None = None,
             th: Thresholds | None = None) -> list[Finding]:
    """Every finding of the detectors on per-chunk train and val curves (chunks numbered from 1)."""
    ctx, th = ctx or Context(), th or Thresholds()
    spikes = {k: find_spikes(*train[k], th.spike_window, th.spike_z) for k in sorted(train)}
    batch, spikes = batch_spikes(spikes)
    findings = ([batch] if batch else []) + _spikes(spikes, ctx)
    findings += _rising(train, ctx, th) + _overfitting(train, val, th)
    findings += _plateaus(val, ctx, th, findings)
    if ctx.unigram_entropy:
        findings += _underfitting(train, spikes, ctx, th, findings)
    return sorted(findings, key=lambda f: (f.chunk, f.first_step, f.kind))


def _weight(ctx: Context, k: int) -> float:
    return ctx.loss_weights[k - 1] if ctx.loss_weights and k - 1 < len(ctx.loss_weights) else 1.0


def _spikes(spikes: dict[int, list], ctx: Context) -> list[Finding]:
    """Each chunk's own spikes (batch spikes are out: a spike chunk k-1 shares here is one chunk 1 did not have,
    so chunk k-1's own)."""
    findings = []
    for k, found in spikes.items():
        if not found:
            continue
        steps = [s for s, _, _ in found]
        shown = ", ".join(f"{s} (z={z:.0f})" for s, _, z in found[:8]) + (" ..." if len(found) > 8 else "")
        upstream = [s for s in steps if any(abs(s - p) <= 1 for p, _, _ in spikes.get(k - 1, []))]
        if len(upstream) > len(steps) / 2:
            cause = f"they follow spikes of chunk {k - 1}, whose output is this chunk's input"
            remedy = f"treat chunk {k - 1}'s spikes first"
        elif len(found) >= 3:
            cause, remedy = lr_too_high(k, _lr_at(ctx, k, steps[0]))
        else:
            cause = "an unusual batch, or a learning rate near the edge of stability"
            remedy = f"nothing if they stay rare; if they recur, lower chunk {k}'s learning rate or grad_clip"
        plural = "s" * (len(found) > 1)
        findings.append(Finding("spike", k, steps[0], steps[-1], f"{len(found)} spike{plural} at step{plural} {shown}",
                                cause, remedy))
    return findings


def _rising(train: dict[int, Curve], ctx: Context, th: Thresholds) -> list[Finding]:
    findings = []
    rising = {k: find_rising(*train[k], th.rise_window, th.rise_rel) for k in sorted(train)}
    for k, found in rising.items():
        for first, last, best, high in found:
            lr, peak = _lr_at(ctx, k, first), _peak_lr(ctx, k)
            cause, remedy = lr_too_high(k, lr)
            if lr is not None and peak:
                cause += f", {lr / peak:.0%} of its peak"
            later = [v for s_, v in zip(*train[k]) if s_ > last]
            if later and np.nanmedian(later[-th.rise_window:]) < best:
                cause += "; the loss fell below its earlier best only once the schedule lowered the LR"
            if any(_overlaps((first, last), (a, b)) for a, b, _, _ in rising.get(k - 1, [])):
                cause += f"; chunk {k - 1}'s loss rose over the same steps, so this chunk's input moved too"
            findings.append(Finding(
                "rising loss", k, first, last,
                f"median train loss per {th.rise_window} steps rose from its best {best:.3f} to {high:.3f} "
                f"(+{high / best - 1:.1%}) over steps {first}-{last}", cause, remedy))
    return findings


def _overfitting(train: dict[int, Curve], val: dict[int, Curve], th: Thresholds) -> list[Finding]:
    findings = []
    for k in sorted(val):
        if k not in train:
            continue
        for first, last, rise, slope in find_overfitting(train[k], val[k], th.plateau_evals):
            findings.append(Finding(
                "overfitting", k, first, last,
                f"val loss rose by {rise:.4f} over steps {first}-{last} while the train loss fell; the val - train "
                f"gap grows by {slope:.4f} per 1,000 steps",
                f"chunk {k} fits the training data and stops generalizing",
                "more data, dropout (model.dropout), more weight decay (optim.weight_decay), or stop earlier "
                "(checkpoints/best.ckpt holds the lowest val loss)", split="val"))
    return findings


def _plateaus(val: dict[int, Curve], ctx: Context, th: Thresholds, found_so_far: list[Finding]) -> list[Finding]:
    findings = []
    plateaus = {k: find_plateaus(*val[k], th.plateau_evals, th.plateau_rel) for k in sorted(val)}
    explained = {(f.chunk, f.first_step, f.last_step) for f in found_so_far if f.kind in ("overfitting", "rising loss")}
    for k, found in plateaus.items():
        # a stall of the best val loss while the loss rises (or val rises as train falls) is found above
        found = [p for p in found if not any(c == k and _overlaps(p[:2], (a, b)) for c, a, b in explained)]
        weight = _weight(ctx, k)
        for first, last, improvement in found:
            lr, peak = _lr_at(ctx, k, last), _peak_lr(ctx, k)
            if weight == 0:
                cause, remedy = "its loss weight is 0, so it is not trained", "nothing (intended) or give it a weight"
            elif any(_overlaps((first, last), (a, b)) for a, b, _ in plateaus.get(k - 1, [])):
                cause = f"its input stopped improving: chunk {k - 1} plateaued over the same steps"
                remedy = (f"improve chunk {k - 1} first, give chunk {k} more of the model (boundaries=[...]), "
                          f"let it reach into chunk {k - 1} (overlap=1), or switch to global training (switch.at)")
            elif lr is not None and peak and lr < 0.2 * peak:
                cause = f"the schedule has decayed chunk {k}'s learning rate to {lr:.2e} ({lr / peak:.0%} of its peak)"
                remedy = "expected near the end of a decaying schedule; train longer for more"
            elif _improved_after(val[k], last, th.plateau_rel * th.plateau_evals) and lr is not None and \
                    _lr_at(ctx, k, val[k][0][-1]) < 0.5 * lr:
                cause, remedy = lr_too_high(k, lr)
                cause += "; the val loss improved again only once the schedule lowered the LR"
            else:
                at = f" ({lr:.2e})" if lr is not None else ""
                cause = f"chunk {k}'s learning rate{at} is too low for progress, or the chunk is at its capacity"
                remedy = (f"raise chunk {k}'s learning rate (optim.chunk_lr; see analysis/lr_range_test.py) "
                          f"or give it more blocks")
            findings.append(Finding("plateau", k, first, last,
                                    f"best val loss improved by {improvement:.3%} over steps {first}-{last} "
                                    f"(threshold {th.plateau_rel:.1%} per {th.plateau_evals} evaluations)",
                                    cause, remedy, split="val"))
    return findings


def _underfitting(train: dict[int, Curve], spikes: dict[int, list], ctx: Context, th: Thresholds,
                  found_so_far: list[Finding]) -> list[Finding]:
    findings = []
    baseline = ctx.unigram_entropy * ctx.loss_terms
    for k in sorted(train):
        weight = _weight(ctx, k)
        found = underfitting(train[k], baseline, ctx.warmup_steps, th.underfit_margin) if weight else None
        if not found:
            continue
        first, last, mean = found
        n_spikes = len(spikes.get(k, []))
        if n_spikes >= 3 or any(f.kind == "divergence" and f.chunk == k for f in found_so_far):
            cause, remedy = lr_too_high(k, _lr_at(ctx, k, last))
        else:
            cause = f"chunk {k} has not learned to use context yet (too few steps, or a learning rate too low)"
            remedy = "train longer, or raise its learning rate (analysis/lr_range_test.py suggests one)"
        findings.append(Finding(
            "underfitting", k, first, last,
            f"mean train loss {mean:.3f} over steps {first}-{last} is not clearly below the unigram entropy "
            f"{baseline:.3f} nats (margin {th.underfit_margin:.0%}), the loss of a model that ignores context",
            cause, remedy))
    return findings


def divergence_finding(chunk: int, step: int, evidence: str, ctx: Context, split: str = "train") -> Finding:
    cause, remedy = lr_too_high(chunk, _lr_at(ctx, chunk, step))
    return Finding("divergence", chunk, step, step, evidence, cause, remedy, split=split)


def report(findings: list[Finding]) -> str:
    """Findings as markdown lines (what the console, TensorBoard and diagnostics.json's readers see)."""
    if not findings:
        return "No problems found in any chunk's loss curves."
    return "\n".join(f"- {f.line()}" for f in findings)
