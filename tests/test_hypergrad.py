"""Hypergradient learning rates: the right direction on a quadratic, the paper's rule, and in a run."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.errors import ConfigError
from locallearn.runner import build, train
from locallearn.training.hypergrad import HypergradientLR

A = torch.tensor([1.0, 4.0])  # f(x) = 1/2 sum A x^2: curvatures 1 and 4, stable for SGD below lr = 2/4


def descend(lr: float, steps: int, beta: float, optimizer=torch.optim.SGD, **kw):
    """Minimize the quadratic from x = (1, 1) with hypergradient LR adaptation; return the LRs used."""
    x = torch.nn.Parameter(torch.ones(2))
    opt = optimizer([{"params": [x], "lr": lr, "chunk": 0}], **kw)
    hyper = HypergradientLR(opt, beta)
    used = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (A * x ** 2).sum()).backward()
        hyper.adapt()
        used.append(opt.param_groups[0]["lr"])
        hyper.before_step()
        opt.step()
        hyper.after_step()
    return used, x.detach()


def test_a_too_small_learning_rate_grows():
    used, _ = descend(lr=0.01, steps=20, beta=0.01)
    assert used[-1] > 2 * used[0]
    assert all(b >= a for a, b in zip(used, used[1:]))  # successive gradients agree: the LR only grows


def test_a_too_large_learning_rate_shrinks():
    used, x = descend(lr=0.45, steps=30, beta=0.01)  # 0.45 x 4 = 1.8: the stiff coordinate flips sign each step
    assert used[-1] < used[0]
    assert x.abs().max() < 0.1  # and the descent still converges


def test_adam_moves_the_same_way():
    small, _ = descend(lr=1e-3, steps=20, beta=1e-3, optimizer=torch.optim.AdamW, weight_decay=0.0)
    assert small[-1] > small[0]


def test_the_update_is_the_papers_rule_for_sgd():
    # alpha_t = alpha_{t-1} + beta grad f(x_t) . grad f(x_{t-1}) for SGD
    beta, lr = 0.01, 0.1
    used, _ = descend(lr=lr, steps=3, beta=beta)
    x0 = torch.ones(2)
    g0 = A * x0
    x1 = x0 - lr * g0
    g1 = A * x1
    assert used[1] == pytest.approx(lr + beta * float(g1 @ g0), rel=1e-5)


def test_a_run_adapts_and_logs_each_chunks_lr(make_cfg):
    cfg = make_cfg("chunks=2", "schedule=constant", "optim.hypergrad_lr=1e-4")
    train(cfg)
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for k in (1, 2):
        lrs = [e.value for e in acc.Scalars(f"train/lr/chunk{k}")]
        assert lrs[0] == pytest.approx(1e-3) and len(set(lrs)) > 1  # adapted from the second step on
        assert len(acc.Scalars(f"train/hypergrad/chunk{k}")) == 6


def test_a_non_positive_step_size_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"optim.hypergrad_lr=-0.1 must be a finite number above 0 or null; a "):
        build(make_cfg("optim.hypergrad_lr=-0.1"))
