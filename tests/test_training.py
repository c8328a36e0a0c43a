"""Training through the real config and LightningModule: equivalences and determinism."""

import copy
import math
import re

import lightning as L
import pytest
import torch

from locallearn.build import quiet_lightning
from locallearn.checks.run import check_run
from locallearn.errors import ConfigError
from locallearn.model.gpt import GPT
from locallearn.runner import build
from locallearn.training.schedules import warmup_cosine

quiet_lightning()


class LossRecorder(L.Callback):
    """Collects the per-chunk training losses of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append([float(v) for v in outputs["losses"]])


def fit(cfg, before=None):
    run = build(cfg)
    if before:
        before(run)
    recorder = LossRecorder()
    run.trainer.callbacks.append(recorder)
    initial = copy.deepcopy(run.module.net.state_dict())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run, recorder.losses, initial


def take(loader, n):
    return [x for x, _ in zip(loader, range(n))]


def test_global_step_counts_batches(make_cfg):
    run, losses, _ = fit(make_cfg("chunks=4", "mode=sequential"))
    assert run.trainer.global_step == 6 and len(losses) == 6
    assert all(len(step) == 4 for step in losses)


@pytest.mark.parametrize("chunks", [2, 4])
def test_joint_and_sequential_reach_the_same_parameters(make_cfg, chunks):
    joint, joint_losses, _ = fit(make_cfg(f"chunks={chunks}", "mode=joint"))
    seq, seq_losses, _ = fit(make_cfg(f"chunks={chunks}", "mode=sequential"))
    torch.testing.assert_close(torch.tensor(joint_losses), torch.tensor(seq_losses), rtol=0, atol=1e-6)
    for (name, a), b in zip(joint.module.net.named_parameters(), seq.module.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs between joint and sequential")
    # and training did move the parameters
    assert joint_losses[-1][-1] < joint_losses[0][-1]


@pytest.mark.parametrize("mode,objective", [("sequential", "clm"), ("sequential", "mlm"), ("pipeline", "clm")])
def test_a_loss_scored_in_slices_makes_the_same_updates_with_fewer_saved_bytes(make_cfg, mode, objective):
    whole, whole_losses, _ = fit(make_cfg("chunks=2", f"mode={mode}", f"objective={objective}"))
    # 16 positions in 3 slices of 6, 6 and 4: the last one shorter
    sliced, sliced_losses, _ = fit(make_cfg("chunks=2", f"mode={mode}", f"objective={objective}", "loss_slices=3"))
    torch.testing.assert_close(torch.tensor(sliced_losses), torch.tensor(whole_losses), rtol=0, atol=1e-6)
    for (name, a), b in zip(whole.module.net.named_parameters(), sliced.module.net.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"{name} differs when the loss is sliced")
    saved = [r.module.process_activation_bytes for r in (whole, sliced)]
    assert all(s < w for w, s in zip(*saved)), saved  # every chunk's process keeps less for backward


@pytest.mark.parametrize("overrides, message", [
    (["mode=joint"], "loss_slices=4 saves memory where chunks backpropagate one at a time, but mode=joint"),
    (["mode=sequential", "objective=span"], "objective=span cannot (its span-boundary term reads across them)"),
    (["mode=sequential", "method=synthetic"], "cannot slice method=synthetic's term on the chunk's whole output"),
    (["mode=sequential", "loss_slices=17"], "loss_slices=17 exceeds data.block_size=16"),
])
def test_what_a_sliced_loss_cannot_run_with_is_refused_in_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        check_run(make_cfg(*overrides, *[] if any("loss_slices" in o for o in overrides) else ["loss_slices=4"]))
    assert "\n" not in str(e.value)


def test_one_chunk_is_a_plain_training_loop(make_cfg):
    cfg = make_cfg("chunks=1", "trainer.max_steps=8")
    batches = []
    run, losses, initial = fit(cfg, before=lambda run: batches.extend(take(run.datamodule.train_dataloader(), 8)))

    # The same training written by hand: GPT, AdamW (decay on matrices), warmup+cosine, clipping.
    model = GPT(run.module.net.gpt.config)
    model.load_state_dict({k.removeprefix("gpt."): v for k, v in initial.items()})
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2],
                                                           "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
    )
    sched = warmup_cosine(opt, total_steps=8, warmup_steps=cfg.schedule.warmup_steps,
                          min_lr_ratio=cfg.schedule.min_lr_ratio)
    plain = []
    for x in batches:
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        plain.append(loss.item())
    assert len(losses) == 8
    for step, (ours, theirs) in enumerate(zip(losses, plain)):
        assert math.isclose(ours[0], theirs, rel_tol=1e-6), f"step {step}: {ours[0]} != {theirs}"
    for (name, a), b in zip(run.module.net.gpt.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_same_seed_same_curve_other_seed_other_curve(make_cfg):
    _, a, _ = fit(make_cfg("chunks=2", "model.dropout=0.1"))
    _, b, _ = fit(make_cfg("chunks=2", "model.dropout=0.1"))
    _, c, _ = fit(make_cfg("chunks=2", "model.dropout=0.1", "seed=1"))
    assert a == b
    assert a != c


def test_validation_runs_at_the_last_step(make_cfg):
    # 7 steps with validation every 3: Lightning alone would validate at steps 3 and 6 only.
    run, _, _ = fit(make_cfg("chunks=2", "trainer.max_steps=7"))
    assert run.trainer.global_step == 7
    logged = run.trainer.logged_metrics
    assert {"val/loss/chunk1", "val/loss/chunk2", "val/bits_per_token/chunk2", "val/loss"} <= set(logged)
    assert not any("bpc" in t for t in logged)  # generated tokens are no characters: no bits per character
    assert run.module.final_val is not None
    torch.testing.assert_close(logged["val/bits_per_token/chunk2"], logged["val/loss/chunk2"] / math.log(2))


def test_training_learns_the_synthetic_language(make_cfg):
    """Every chunk ends well below the unigram entropy: the package learns, and so does each local loss."""
    run, _, _ = fit(make_cfg("chunks=2", "mode=sequential", "trainer.max_steps=300", "trainer.val_check_interval=100",
                             "data.batch_size=16", "optim.lr=3e-3", "schedule.warmup_steps=10"))
    unigram = run.datamodule.unigram_entropy()
    assert all(v < unigram - 0.8 for v in run.module.final_val), (run.module.final_val, unigram)


def test_the_val_loss_is_a_weighted_mean_and_a_nan_batch_makes_it_nan(make_cfg):
    metric = build(make_cfg("chunks=2")).module.metrics.loss[0]
    metric.update(torch.tensor(1.0), weight=3)
    metric.update(torch.tensor(2.0), weight=1)
    assert float(metric.compute()) == pytest.approx(1.25)  # weighted by the batches' targets
    metric.update(torch.tensor(float("nan")), weight=2)
    assert math.isnan(float(metric.compute()))  # not dropped: a partly diverged model does not look finite


@pytest.mark.slow  # compiling the blocks takes a minute on two CPU cores
@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_compiled_blocks_train_as_the_eager_ones(make_cfg, mode):
    _, eager, _ = fit(make_cfg("chunks=2", f"mode={mode}", "trainer.max_steps=4"))
    run, compiled, _ = fit(make_cfg("chunks=2", f"mode={mode}", "trainer.max_steps=4", "compile=true"))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in run.module.net.gpt.blocks)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles the blocks
def test_the_blocks_only_benchmark_times_eager_and_compiled_blocks_that_agree():
    from locallearn.measure import measure_blocks
    from tests.conftest import TINY

    result = measure_blocks(TINY, steps=3, warmup=1)
    assert result["eager_ms"] > 0 and result["compiled_ms"] > 0
    assert result["speedup"] == pytest.approx(result["eager_ms"] / result["compiled_ms"])
    assert result["max_abs_diff"] < 1e-4  # the compiled blocks compute what the eager ones do
