"""Learning-rate schedules, built as ``_partial_`` objects and called with ``(optimizer, total_steps)``."""

import math

from torch.optim.lr_scheduler import LambdaLR

from locallearn.errors import ConfigError


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the base LR."""
    if warmup_steps < 0 or (total_steps > 0 and warmup_steps >= total_steps):
        raise ConfigError(
            f"schedule.warmup_steps={warmup_steps} must be at least 0 and shorter than the run "
            f"(trainer.max_steps={total_steps}); lower the warmup or train longer."
        )
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
