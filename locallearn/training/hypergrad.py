"""Hypergradient learning rates (Baydin et al. 2018, "Online learning rate adaptation with
hypergradient descent"), one per chunk.

The loss after a step depends on the learning rate that made the step: with theta_t = theta_{t-1} +
d_t and d_t linear in the LR alpha_t (true for SGD, Adam and AdamW, weight decay included), the
derivative of f(theta_t) with respect to alpha_t is h = grad f(theta_t) . d_t / alpha_t. Gradient descent
on the learning rate itself, one step per training step, gives

    alpha <- alpha - beta * h

so the LR grows while successive updates point the same way (h < 0) and shrinks when they undo
each other (h > 0). Each chunk gets its own alpha from its own gradients and updates, which is the
point in local learning: chunks see different losses and need different rates.

The adapted LR multiplies the schedule: a chunk's LR is (scheduled LR) x m_k, and the hypergradient
step moves m_k. With ``schedule=constant`` this is exactly the paper's rule. m_k is kept at or above
``floor`` so that a chunk never stops for good (a zero LR would leave no update to learn from).
"""

import torch


class HypergradientLR:
    """Per-chunk hypergradient LR adaptation for an optimizer with param groups tagged ``chunk=k``.

    Call, in a training step: :meth:`adapt` after backward and before clipping (it needs the raw
    gradient), :meth:`before_step` just before ``optimizer.step()``, :meth:`after_step` just after,
    and, if there is an LR scheduler, :meth:`apply` after its step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, beta: float, floor: float = 1e-3):
        if beta <= 0:
            raise ValueError(f"hypergradient step size beta={beta} must be positive")
        self.optimizer, self.beta, self.floor = optimizer, float(beta), floor
        chunks = sorted({g["chunk"] for g in optimizer.param_groups})
        self.groups = {k: [g for g in optimizer.param_groups if g["chunk"] == k] for k in chunks}
        self.multiplier = {k: 1.0 for k in chunks}
        self.last_hypergrad = {k: 0.0 for k in chunks}
        self._direction: dict[int, list[torch.Tensor]] | None = None  # d_t / alpha_t of the last step, per chunk
        self._before: dict[int, list[torch.Tensor]] | None = None

    def _params(self, k):
        return [p for g in self.groups[k] for p in g["params"]]

    @torch.no_grad()
    def adapt(self):
        """One hypergradient step on each chunk's LR, from this step's gradient and the last update."""
        if self._direction is None:
            return
        for k, groups in self.groups.items():
            h = sum(((p.grad * u).sum() for p, u in zip(self._params(k), self._direction[k]) if p.grad is not None),
                    torch.zeros(()))
            h = float(h)
            self.last_hypergrad[k] = h
            lr = groups[0]["lr"]
            scheduled = lr / self.multiplier[k]
            if scheduled <= 0:
                continue
            new_lr = max(lr - self.beta * h, self.floor * scheduled)
            self.multiplier[k] = new_lr / scheduled
            for g in groups:
                g["lr"] = new_lr

    @torch.no_grad()
    def before_step(self):
        self._before = {k: [p.detach().clone() for p in self._params(k)] for k in self.groups}

    @torch.no_grad()
    def after_step(self):
        direction = {}
        for k, groups in self.groups.items():
            lr = groups[0]["lr"]
            # d/alpha: the parameters' derivative with respect to this step's LR
            direction[k] = [(p.detach() - b).div_(lr) if lr > 0 else torch.zeros_like(b)
                            for p, b in zip(self._params(k), self._before[k])]
        self._direction, self._before = direction, None

    def apply(self):
        """Scale the LRs the scheduler just set by each chunk's multiplier (only after a scheduler's step:
        without a scheduler the LRs already carry the multipliers)."""
        for k, groups in self.groups.items():
            for g in groups:
                g["lr"] *= self.multiplier[k]

    def state_dict(self) -> dict:
        return {"multiplier": dict(self.multiplier), "direction": self._direction}

    def load_state_dict(self, state: dict):
        self.multiplier.update({int(k): float(v) for k, v in state["multiplier"].items()})
        if state.get("direction") is not None:
            self._direction = {int(k): [t.to(p.device) for t, p in zip(v, self._params(int(k)))]
                               for k, v in state["direction"].items()}
