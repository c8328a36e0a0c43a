"""Local-to-global switch and its optional EWC anchor.

From ``at`` x total steps on, gradients cross chunk boundaries and training continues end to end on
the last chunk's loss (auxiliary losses kept with weight ``aux_weight``). With ``ewc_lambda > 0``,
the diagonal Fisher of each earlier chunk's local loss is estimated at the switch, and a penalty
``ewc_lambda / 2 * sum F (theta - theta_switch)^2`` anchors that chunk's parameters to their values
at the switch (elastic weight consolidation, Kirkpatrick et al. 2017).
"""

from dataclasses import dataclass

import torch

from locallearn.errors import ConfigError


@dataclass
class Switch:
    at: float | None = None  # fraction of trainer.max_steps where global training starts; None: never
    aux_weight: float = 0.0  # weight of the auxiliary (earlier chunks') losses in the global phase
    ewc_lambda: float = 0.0  # strength of the EWC anchor on earlier chunks; 0: off

    def __post_init__(self):
        if self.at is not None and not 0.0 < self.at <= 1.0:
            raise ConfigError(f"switch.at={self.at} must lie in (0, 1] (a fraction of trainer.max_steps), "
                              f"or be null for no switch.")
        if self.aux_weight < 0 or self.ewc_lambda < 0:
            raise ConfigError(f"switch.aux_weight={self.aux_weight} and switch.ewc_lambda={self.ewc_lambda} "
                              f"must not be negative.")

    def step(self, max_steps: int) -> int | None:
        """The first global step (a step index), or None."""
        return None if self.at is None else int(round(self.at * max_steps))


class EWC:
    """Diagonal-Fisher anchor for a set of named parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor]):
        self.params = params
        self.fisher = fisher
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    @classmethod
    def estimate(cls, params: dict[str, torch.nn.Parameter], losses) -> "EWC":
        """``losses``: an iterable of scalar losses (one per sample); F = mean of squared gradients."""
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for loss in losses:
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            count += 1
        return cls(params, {n: f / max(count, 1) for n, f in fisher.items()})

    def penalty(self, strength: float):
        return 0.5 * strength * sum((f * (self.params[n] - self.anchor[n]) ** 2).sum() for n, f in self.fisher.items())

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    @classmethod
    def from_state(cls, params, state) -> "EWC":
        ewc = cls(params, {n: f.to(params[n].device) for n, f in state["fisher"].items()})
        ewc.anchor = {n: a.to(params[n].device) for n, a in state["anchor"].items()}
        return ewc
