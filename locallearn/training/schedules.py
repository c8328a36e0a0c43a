"""Learning-rate schedules, built as ``_partial_`` objects and called with ``(optimizer, total_steps)``.

Every schedule scales each param group's own learning rate (``optim.lr``, or ``optim.chunk_lr`` per
chunk), so per-chunk learning rates keep their ratios. With t the step (0-based) and lr the group's LR:

* ``constant``: lr.
* ``warmup_cosine``: lr (t+1)/w during the warmup w (``warmup_steps``, or the fraction ``warmup`` of the run),
  then cosine decay to ``min_lr_ratio`` lr at the end.
* ``cyclic`` (Smith 2017), torch's ``CyclicLR``: cycles of ``cycle_steps`` steps, the LR rising linearly
  from the base, ``base_lr_ratio`` lr, to the peak in the first half and falling back in the second.
  The base stays; what changes is the amplitude, the distance from the base to the peak, (1 -
  ``base_lr_ratio``) lr in the first cycle. ``triangular`` keeps it (every peak is lr), ``triangular2``
  halves it every cycle (cycle n, from 1, peaks at base + (lr - base) / 2^(n-1): the peak tends to
  the base, not to 0), and ``exp_range`` scales it by gamma^t.
* ``one_cycle`` (Smith 2018), torch's ``OneCycleLR``: from lr/``div_factor`` up to lr over the first
  ``pct_start`` of the run, then down to lr/(``div_factor`` x ``final_div_factor``); with
  ``cycle_momentum`` Adam's beta1 moves the other way, from ``max_momentum`` down to ``base_momentum``
  at the LR peak and back up.
"""

import math

from torch.optim.lr_scheduler import CyclicLR, LambdaLR, LRScheduler, OneCycleLR

from locallearn.errors import ConfigError


def warmup_length(total_steps: int, warmup: float = 0.05, warmup_steps: int | None = None) -> int:
    """The warmup in steps: ``warmup_steps`` when given, else the fraction ``warmup`` of the run, rounded (so that a
    run of any length warms up for the same share of it: 100 of 2,000 steps, 2 of 50)."""
    if warmup_steps is None:
        if not 0.0 <= warmup < 1.0:
            raise ConfigError(f"schedule.warmup={warmup} must lie in [0, 1): the fraction of trainer.max_steps the LR "
                              f"warms up for (or set schedule.warmup_steps to a number of steps).")
        return round(warmup * total_steps)
    if warmup_steps < 0 or (total_steps > 0 and warmup_steps >= total_steps):
        raise ConfigError(
            f"schedule.warmup_steps={warmup_steps} must be at least 0 and shorter than the run "
            f"(trainer.max_steps={total_steps}); lower the warmup, train longer, or set schedule.warmup_steps=null "
            f"to warm up for the fraction schedule.warmup of the run."
        )
    return warmup_steps


def warmup_cosine(optimizer, total_steps: int, warmup: float = 0.05, warmup_steps: int | None = None,
                  min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup from 0 over :func:`warmup_length` steps, then cosine decay to ``min_lr_ratio`` x the base LR."""
    warmup_steps = warmup_length(total_steps, warmup, warmup_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={min_lr_ratio} must lie in [0, 1].")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer, total_steps: int) -> LambdaLR:
    """The base learning rate throughout."""
    return LambdaLR(optimizer, lambda step: 1.0)


CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def cyclic(optimizer, total_steps: int, mode: str = "triangular", cycle_steps: int = 500,
           base_lr_ratio: float = 0.1, gamma: float = 0.999, cycle_momentum: bool = False,
           base_momentum: float = 0.85, max_momentum: float = 0.95) -> CyclicLR:
    """Cyclical learning rates between ``base_lr_ratio`` x lr and lr (see the module docstring)."""
    if mode not in CYCLIC_MODES:
        raise ConfigError(f"schedule.mode={mode!r} is not a cyclical mode; use one of {', '.join(CYCLIC_MODES)}.")
    if cycle_steps < 2:
        raise ConfigError(f"schedule.cycle_steps={cycle_steps} must be at least 2 (a cycle rises for half its "
                          f"steps and falls for the other half).")
    if total_steps > 0 and cycle_steps > total_steps:
        raise ConfigError(f"schedule.cycle_steps={cycle_steps} is longer than the run (trainer.max_steps="
                          f"{total_steps}); use a shorter cycle, or schedule=one_cycle for one cycle over the run.")
    if not 0.0 < base_lr_ratio < 1.0:
        raise ConfigError(f"schedule.base_lr_ratio={base_lr_ratio} must lie in (0, 1): the cycle's lowest LR "
                          f"as a fraction of its peak.")
    if mode == "exp_range" and not 0.0 < gamma <= 1.0:
        raise ConfigError(f"schedule.gamma={gamma} must lie in (0, 1] for mode=exp_range (the amplitude shrinks "
                          f"as gamma^step).")
    _check_momentum(cycle_momentum, base_momentum, max_momentum)
    peaks = [g["lr"] for g in optimizer.param_groups]
    return CyclicLR(optimizer, base_lr=[base_lr_ratio * p for p in peaks], max_lr=peaks,
                    step_size_up=cycle_steps // 2, step_size_down=cycle_steps - cycle_steps // 2, mode=mode,
                    gamma=gamma, cycle_momentum=cycle_momentum, base_momentum=base_momentum,
                    max_momentum=max_momentum)


def one_cycle(optimizer, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, anneal_strategy: str = "cos", cycle_momentum: bool = True,
              base_momentum: float = 0.85, max_momentum: float = 0.95, three_phase: bool = False) -> OneCycleLR:
    """One cycle over the whole run, peaking at each group's lr (see the module docstring)."""
    if total_steps < 2:
        raise ConfigError(f"schedule=one_cycle needs a run of at least 2 steps, not trainer.max_steps={total_steps}.")
    if not 0.0 < pct_start < 1.0:
        raise ConfigError(f"schedule.pct_start={pct_start} must lie in (0, 1): the fraction of the run the LR rises.")
    if div_factor <= 1 or final_div_factor < 1:
        raise ConfigError(f"schedule.div_factor={div_factor} must exceed 1 and schedule.final_div_factor="
                          f"{final_div_factor} be at least 1 (they divide the peak LR).")
    if anneal_strategy not in ("cos", "linear"):
        raise ConfigError(f"schedule.anneal_strategy={anneal_strategy!r} must be cos or linear.")
    _check_momentum(cycle_momentum, base_momentum, max_momentum)
    return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                      pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor,
                      anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum, base_momentum=base_momentum,
                      max_momentum=max_momentum, three_phase=three_phase)


def _check_momentum(cycle: bool, base: float, peak: float):
    if cycle and not 0.0 <= base <= peak < 1.0:
        raise ConfigError(f"schedule.base_momentum={base} and schedule.max_momentum={peak} must satisfy "
                          f"0 <= base_momentum <= max_momentum < 1.")


def cycles_momentum(scheduler: LRScheduler | None) -> bool:
    """Whether the schedule moves the optimizer's momentum (beta1) too, so it is worth logging."""
    return bool(getattr(scheduler, "cycle_momentum", False))
