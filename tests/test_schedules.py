"""Each schedule produces the LR trace its docstring documents, per chunk, in a run as in isolation."""

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.errors import ConfigError
from locallearn.runner import build, train
from locallearn.training import schedules

PEAKS = [1e-3, 3e-3]  # two chunks with their own learning rates


def trace(make, steps: int, betas=(0.9, 0.99)):
    """The LR of each group and beta1 at steps 0..steps-1 (what each optimizer step uses)."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr, "chunk": k} for k, lr in enumerate(PEAKS)]
    opt = torch.optim.AdamW(groups, betas=betas)
    sched = make(opt)
    lrs, momenta = [], []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        momenta.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return lrs, momenta


def triangle(t: int, cycle: int) -> float:
    """0 at the start of each cycle, 1 at its middle."""
    x = (t % cycle) / (cycle / 2)
    return x if x <= 1 else 2 - x


def test_constant():
    lrs, _ = trace(lambda o: schedules.constant(o, 50), 50)
    assert all(row == PEAKS for row in lrs)


def test_warmup_cosine():
    T, w, r = 100, 10, 0.1
    lrs, _ = trace(lambda o: schedules.warmup_cosine(o, T, warmup_steps=w, min_lr_ratio=r), T)
    for t, row in enumerate(lrs):
        f = (t + 1) / w if t < w else r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (t - w) / (T - w)))
        assert row == pytest.approx([p * f for p in PEAKS])


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic(mode):
    T, cycle, ratio, gamma = 60, 20, 0.1, 0.99
    lrs, _ = trace(lambda o: schedules.cyclic(o, T, mode=mode, cycle_steps=cycle, base_lr_ratio=ratio, gamma=gamma), T)
    for t, row in enumerate(lrs):
        scale = {"triangular": 1.0, "triangular2": 0.5 ** (t // cycle), "exp_range": gamma ** t}[mode]
        want = [ratio * p + (p - ratio * p) * triangle(t, cycle) * scale for p in PEAKS]
        assert row == pytest.approx(want, rel=1e-6), f"step {t}"
    assert lrs[cycle // 2] == pytest.approx(PEAKS) if mode != "exp_range" else True  # the first peak


def test_cyclic_momentum_moves_against_the_lr():
    lrs, momenta = trace(lambda o: schedules.cyclic(o, 40, cycle_steps=20, cycle_momentum=True), 40)
    assert [momenta[0], momenta[10], momenta[20]] == pytest.approx([0.95, 0.85, 0.95])


def test_one_cycle_with_cyclical_momentum():
    T, pct, div, final = 100, 0.3, 25.0, 1e4
    lrs, momenta = trace(lambda o: schedules.one_cycle(o, T, pct_start=pct, div_factor=div, final_div_factor=final), T)
    up = pct * T - 1  # the step at which the LR peaks

    def cos(a, b, p):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * p))

    for t, row in enumerate(lrs):
        if t <= up:
            want = [cos(p / div, p, t / up) for p in PEAKS]
            m = cos(0.95, 0.85, t / up)
        else:
            want = [cos(p, p / (div * final), (t - up) / (T - 1 - up)) for p in PEAKS]
            m = cos(0.85, 0.95, (t - up) / (T - 1 - up))
        assert row == pytest.approx(want, rel=1e-6), f"step {t}"
        assert momenta[t] == pytest.approx(m, rel=1e-6)
    assert lrs[0] == pytest.approx([p / div for p in PEAKS]) and lrs[29] == pytest.approx(PEAKS)


@pytest.mark.parametrize("overrides, message", [
    (["schedule=cyclic", "schedule.cycle_steps=0"], "schedule.cycle_steps=0 must be a whole number of at least 2"),
    (["schedule=cyclic", "schedule.cycle_steps=50"], "schedule.cycle_steps=50 is longer than the run"),
    (["schedule=cyclic", "schedule.mode=sawtooth"],
     "schedule.mode=sawtooth must be one of triangular, triangular2, exp_range"),
    (["schedule=cyclic", "schedule.cycle_steps=4", "schedule.base_lr_ratio=1.5"],
     "schedule.base_lr_ratio=1.5 must be a finite number in (0, 1)"),
    (["schedule=one_cycle", "schedule.pct_start=1.2"], "schedule.pct_start=1.2 must be a finite number in (0, 1)"),
    (["schedule=one_cycle", "schedule.base_momentum=0.99"], "schedule.base_momentum=0.99 and schedule.max_momentum"),
    (["schedule.warmup_steps=6"], "schedule.warmup_steps=6 must be at least 0 and shorter than the run"),
])
def test_nonsense_schedule_settings_are_refused_before_training(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        build(make_cfg(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def logged(run_dir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]


def test_a_run_logs_the_lr_each_step_uses_per_chunk(make_cfg):
    cfg = make_cfg("chunks=2", "schedule=cyclic", "schedule.cycle_steps=4", "optim.chunk_lr=[0.002,0.001]",
                   "schedule.cycle_momentum=true")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    for k, peak in ((1, 0.002), (2, 0.001)):
        want = [peak * (0.1 + 0.9 * triangle(t, 4)) for t in range(6)]
        assert logged(out, f"train/lr/chunk{k}") == pytest.approx(want, rel=1e-5)
    assert logged(out, "train/momentum/chunk1") == pytest.approx([0.95, 0.9, 0.85, 0.9, 0.95, 0.9], rel=1e-5)


def test_chunk_lr_must_name_one_rate_per_chunk(make_cfg):
    with pytest.raises(ConfigError, match=r"optim.chunk_lr=\[0.01\] must hold 2 positive learning rates"):
        build(make_cfg("chunks=2", "optim.chunk_lr=[0.01]"))
    with pytest.raises(ConfigError, match=r"optim.chunk_lr=\[0.01,-1\] must be a list of numbers, each a finite"):
        build(make_cfg("chunks=2", "optim.chunk_lr=[0.01,-1]"))


@pytest.mark.parametrize("total, warmup, steps, expected", [
    (2000, 0.05, None, 100),  # the default run: the former 100 steps
    (50, 0.05, None, 2),      # a first smoke test warms up for 2 steps instead of being refused
    (8000, 0.05, 100, 100),   # an absolute warmup wins (the recipes pin theirs)
    (10, 0.0, None, 0),
])
def test_warmup_is_a_fraction_of_the_run_unless_given_in_steps(total, warmup, steps, expected):
    assert schedules.warmup_length(total, warmup, steps) == expected


def test_a_bad_warmup_fraction_is_one_sentence():
    with pytest.raises(ConfigError, match=r"^schedule.warmup=1.5 must lie in \[0, 1\): the fraction of "
                                          r"trainer.max_steps .* \(or set schedule.warmup_steps"):
        schedules.warmup_length(100, 1.5)


def test_a_50_step_run_trains_with_the_default_warmup(make_cfg):
    cfg = make_cfg("trainer.max_steps=50", "schedule.warmup_steps=null", "trainer.val_check_interval=50")
    assert cfg.schedule.warmup == 0.05 and cfg.schedule.warmup_steps is None
    assert train(cfg)["steps"] == 50
