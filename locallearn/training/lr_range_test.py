"""The LR range test (Smith 2017), per chunk.

A fresh model trains for ``steps`` batches while the learning rate grows exponentially from
``lr_min`` to ``lr_max``; every chunk trains on its own local loss as in a real run (same execution
mode, loss weights and per-chunk gradient clipping), all at the same LR. Each chunk's loss is
smoothed by a bias-corrected exponential moving average. Its window (the time constant, 1/(1 - factor)
steps) is by default ``SMOOTH_FRACTION`` of the sweep, because the smoothed curve lags the LR by its
window: as a fraction of the sweep, that is a fixed share of the swept range on a log scale whatever
``steps`` is (5%: a factor 2 over six decades; the classic factor 0.98, a 50-step window, lags a
300-step sweep by a factor 10). A chunk has diverged once its smoothed
loss exceeds ``diverge`` x its lowest one (or is not finite): from then on its LR is 0, so that the
chunks after it keep a fixed input rather than an exploding one, and the test stops when every
chunk has diverged. Per chunk it suggests

* ``steepest``: the LR where the smoothed loss falls fastest against log LR (before its minimum);
* ``min_loss / 10``: a tenth of the LR at the lowest smoothed loss.

Either can be applied to a run as ``optim.chunk_lr=[...]``.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from locallearn.errors import ConfigError
from locallearn.training.update import update

SKIP_START = 5  # the first points of the EMA are too noisy for a slope
SMOOTH_FRACTION = 0.05  # the default EMA window as a fraction of the sweep: 15 steps of 300


@dataclass
class RangeSettings:
    """``lr_range.*`` in conf/lr_range_test.yaml."""

    lr_min: float = 1e-6  # the first step's learning rate
    lr_max: float = 1.0  # the last step's (reached only if some chunk has not diverged by then)
    steps: int = 300  # batches in the sweep: log-spaced LRs
    smooth: float | None = None  # EMA factor of the smoothed loss; None: a window of SMOOTH_FRACTION x steps
    diverge: float = 1.5  # a chunk diverged once its smoothed loss exceeds this x its lowest

    def check(self):
        if not (self.lr_min > 0 and self.lr_max > 0):
            raise ConfigError(f"lr_range.lr_min={self.lr_min} and lr_range.lr_max={self.lr_max} must both be "
                              f"positive learning rates.")
        if self.lr_min >= self.lr_max:
            raise ConfigError(f"lr_range.lr_min={self.lr_min} must be below lr_range.lr_max={self.lr_max}; the "
                              f"sweep goes up from lr_min, so swap them or widen the range.")
        if self.steps < 2 * SKIP_START + 2:
            raise ConfigError(f"lr_range.steps={self.steps} is too short for a range test; use at least "
                              f"{2 * SKIP_START + 2} (100 to 300 is usual).")
        if self.smooth is not None and not 0 <= self.smooth < 1:
            raise ConfigError(f"lr_range.smooth={self.smooth} must lie in [0, 1) (the EMA factor), or be null for "
                              f"a window of {SMOOTH_FRACTION:g} x lr_range.steps.")
        if self.diverge <= 1:
            raise ConfigError(f"lr_range.diverge={self.diverge} must exceed 1 (a multiple of the lowest loss).")

    @property
    def ema_factor(self) -> float:
        """``smooth`` if given, else the factor whose window 1/(1 - factor) is SMOOTH_FRACTION x steps (0 below
        one step: no smoothing)."""
        if self.smooth is not None:
            return self.smooth
        return max(0.0, 1 - 1 / (SMOOTH_FRACTION * self.steps))


@dataclass
class ChunkRange:
    """One chunk's curve and suggestions."""

    chunk: int  # from 1
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged_at: float | None = None  # the LR at which it diverged (None: never within the sweep)
    steepest: float = math.nan
    min_loss_lr: float = math.nan
    min_loss: float = math.nan
    note: str = ""

    def suggest(self):
        s = np.asarray(self.smoothed)
        lrs = np.asarray(self.lrs)
        i_min = int(np.nanargmin(s))
        self.min_loss_lr, self.min_loss = float(lrs[i_min]), float(s[i_min])
        lo = min(SKIP_START, max(i_min - 1, 0))
        if i_min - lo < 2:
            self.steepest = self.min_loss_lr
            self.note = "the loss did not fall before its minimum; the steepest point is the minimum"
            return
        slope = np.gradient(s[lo:i_min + 1], np.log(lrs[lo:i_min + 1]))
        self.steepest = float(lrs[lo + int(np.argmin(slope))])

    def suggestion(self, which: str) -> float:
        return self.steepest if which == "steepest" else self.min_loss_lr / 10


def run(module, batches, settings: RangeSettings, device="cpu", on_step=None) -> list[ChunkRange]:
    """The range test on ``module`` (a :class:`LocalLearner` fresh from ``train.build``), drawing training
    batches from ``batches``; ``on_step(i, lr, losses, smoothed)`` is called after every step."""
    settings.check()
    net = module.net.to(device).train()
    K = len(net)
    opt = module.optimizer_factory(module.param_groups())
    lrs = np.geomspace(settings.lr_min, settings.lr_max, settings.steps)
    results = [ChunkRange(k + 1) for k in range(K)]
    avg, best = [0.0] * K, [math.inf] * K
    diverged = [False] * K
    beta = settings.ema_factor
    batches = iter(batches)
    for i, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = 0.0 if diverged[g["chunk"]] else float(lr)
        prepared = module.objective.prepare(next(batches).to(device), module.mask_generator(i, train=True))
        u = update(opt, net, range(K), module.backward_pass(prepared), i, module.grad_clip)
        values = torch.stack(u.losses).float().tolist()
        smoothed = []
        for k, (r, loss) in enumerate(zip(results, values)):
            if diverged[k]:
                smoothed.append(math.nan)
                continue
            avg[k] = beta * avg[k] + (1 - beta) * loss
            s = avg[k] / (1 - beta ** (i + 1))
            r.lrs.append(float(lr))
            r.losses.append(loss)
            r.smoothed.append(s)
            smoothed.append(s)
            best[k] = min(best[k], s)
            if not math.isfinite(s) or s > settings.diverge * best[k]:
                diverged[k], r.diverged_at = True, float(lr)
        if on_step is not None:
            on_step(i, float(lr), values, smoothed)
        if all(diverged):
            break
    for r in results:
        if not any(math.isfinite(s) for s in r.smoothed):
            raise ConfigError(f"chunk {r.chunk}'s loss was not finite from the first step of the LR range test; "
                              f"lower lr_range.lr_min (now {settings.lr_min}).")
        r.suggest()
    return results
