"""Variants through the real Hydra config: heads, objectives, greedy, overlap, loss weights, switch, EWC."""

import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.build import quiet_lightning
from locallearn.cli import check_group_choices
from locallearn.config import PROJECT_ROOT
from locallearn.errors import ConfigError
from locallearn.model.chunked import ChunkedGPT
from locallearn.model.gpt import GPT, GPTConfig
from locallearn.model.heads import LinearHead
from locallearn.model.objectives import IGNORE
from locallearn.model.plan import ChunkPlan
from locallearn.runner import build, train
from locallearn.training.switch import EWC, FisherDiagonal, chunk_token_terms, earlier_chunk_params
from locallearn.training.update import clip_gradients

quiet_lightning()


class Recorder(L.Callback):
    """Per step: the losses, and which parameters had a gradient at the optimizer step."""

    def __init__(self):
        self.losses, self.aux_grad, self.embed_grad = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        net = pl_module.net
        self.aux_grad.append(any(p.grad is not None for p in net.aux_heads.parameters()))
        self.embed_grad.append(net.gpt.wte.weight.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append([float(v) for v in outputs["losses"]])


def fit(cfg):
    run = build(cfg)
    rec = Recorder()
    run.trainer.callbacks.append(rec)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run, rec


LEARN = ["trainer.max_steps=40", "trainer.val_check_interval=20", "optim.lr=3e-3", "schedule.warmup_steps=4"]


def falls(losses, k=-1, n=5):
    first = sum(step[k] for step in losses[:n]) / n
    last = sum(step[k] for step in losses[-n:]) / n
    return last < first - 0.3, (first, last)


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective=clm", "chunks=2"],
        ["objective=mlm", "chunks=2"],
        ["objective=span", "chunks=2", "mode=sequential"],
        ["head=mlp", "chunks=4"],
        ["head=block", "chunks=4", "mode=sequential"],
        ["variant=greedy"],
        ["chunks=4", "overlap=1"],
        ["variant=interlock2", "mode=sequential"],
        ["chunks=2", "switch.at=0.5", "switch.ewc_lambda=1"],
        ["chunks=2", "loss_weights=[0.5,1]"],
    ],
    ids=lambda o: ",".join(o),
)
def test_variant_trains_and_its_loss_falls(make_cfg, overrides):
    run, rec = fit(make_cfg(*overrides, *LEARN))
    ok, (first, last) = falls(rec.losses)
    assert ok, f"last chunk's loss went from {first:.3f} to {last:.3f}"
    assert all(v == v and v < 10 for v in run.module.final_val)  # finite validation losses for every chunk


def test_summary_reports_head_parameters_and_flops(make_cfg):
    sizes = {}
    for head in ("linear", "mlp", "block"):
        summary = train(make_cfg(f"head={head}", "chunks=2", "trainer.max_steps=2", "schedule.warmup_steps=1"))
        aux = summary["flops_per_token"]["chunk1"]
        sizes[head] = (summary["parameters"]["chunk1"]["head"], aux["head"])
        assert aux["trunk"] > 0 and aux["head"] > 0
        # the last chunk's head is the model's own, whatever the auxiliary head type
        assert summary["flops_per_token"]["chunk2"]["head"] == pytest.approx(2 * 16 * summary["vocab_size"], rel=0.01)
    assert sizes["linear"][0] < sizes["mlp"][0] < sizes["block"][0]
    assert sizes["linear"][1] < sizes["mlp"][1] < sizes["block"][1]
    assert sizes["linear"][1] == pytest.approx(2 * 16 * 248, rel=0.01)  # one matmul C x V per token


def test_greedy_is_one_chunk_per_layer(make_cfg):
    greedy, rec_g = fit(make_cfg("variant=greedy"))
    explicit, rec_e = fit(make_cfg("chunks=4"))
    assert greedy.module.net.plan == explicit.module.net.plan
    assert rec_g.losses == rec_e.losses


def test_switch_changes_gradient_flow_at_the_configured_step(make_cfg):
    # 6 steps, switch.at=0.5: steps 1-3 local, steps 4-6 global on the last chunk's loss only
    run, rec = fit(make_cfg("chunks=2", "switch.at=0.5"))
    assert run.module.switch_step == 3
    assert rec.aux_grad == [True] * 3 + [False] * 3  # auxiliary losses stop training at the switch
    assert rec.embed_grad == [True] * 6  # chunk 1 keeps learning: from the last loss, across the boundary
    assert not run.module.net.local


def test_switch_keeps_auxiliary_losses_with_aux_weight(make_cfg):
    _, rec = fit(make_cfg("chunks=2", "switch.at=0.5", "switch.aux_weight=0.3"))
    assert rec.aux_grad == [True] * 6


def lm_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tiny_net(chunks=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=8, vocab_size=16)
    return ChunkedGPT(GPT(cfg), ChunkPlan.build(4, chunks), LinearHead)


def test_global_steps_clip_the_total_gradient_norm_with_one_factor():
    net = tiny_net(chunks=3)
    x = torch.randint(16, (4, 9), generator=torch.Generator().manual_seed(1))
    for global_phase in (True, False):
        net.zero_grad(set_to_none=True)
        net.local = not global_phase
        losses = [lm_loss(logits, x[:, 1:]) for _, logits in net(x[:, :-1])]
        (losses[-1] if global_phase else sum(losses)).backward()
        raw = [[p.grad.clone() for p in net.chunk_parameters(k) if p.grad is not None] for k in range(3)]
        norms, total = clip_gradients(net, range(3), 0.01, global_phase)
        clipped = [[p.grad for p in net.chunk_parameters(k) if p.grad is not None] for k in range(3)]
        chunk_norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in gs])) for gs in raw]
        torch.testing.assert_close(torch.stack(norms), torch.stack(chunk_norms))  # before clipping
        torch.testing.assert_close(total, torch.linalg.vector_norm(torch.stack(chunk_norms)))
        # the factor each chunk's gradient was scaled by
        factors = [torch.cat([(c / r).flatten() for c, r in zip(cs, rs) if (r != 0).all()]) for cs, rs in
                   zip(clipped, raw)]
        for f in factors:
            torch.testing.assert_close(f, torch.full_like(f, f[0].item()))  # one factor within a chunk
        firsts = torch.stack([f[0] for f in factors])
        if global_phase:  # one factor for the whole model: grad_clip / total norm, as end to end
            torch.testing.assert_close(firsts, torch.full((3,), 0.01 / float(total)), rtol=1e-5, atol=0)
        else:  # each chunk to its own norm
            torch.testing.assert_close(firsts, 0.01 / torch.stack(chunk_norms), rtol=1e-5, atol=0)
            assert firsts.max() > 1.1 * firsts.min()


class GlobalSteps(L.Callback):
    """Before each global step a copy of the model, its optimizer and the batch; after it, the parameters."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.is_global(trainer.global_step):
            self.before[trainer.global_step] = copy.deepcopy((pl_module.net, trainer.optimizers[0])), batch.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.before:
            self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.net.parameters()]


def test_switched_runs_global_steps_are_plain_end_to_end_steps(make_cfg):
    run = build(make_cfg("chunks=2", "switch.at=0.5", "grad_clip=0.05"))  # small enough to clip every step
    steps = GlobalSteps()
    run.trainer.callbacks.append(steps)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert sorted(steps.after) == [3, 4, 5]
    for step, ((net, opt), x) in steps.before.items():
        by_hand = []
        for clip in ("total", "per chunk"):  # the same end-to-end step by hand, from the state before it
            net_, opt_ = copy.deepcopy((net, opt))
            net_.local = False
            lm_loss(net_(x[:, :-1])[-1][1], x[:, 1:]).backward()
            groups = [list(net_.parameters())] if clip == "total" else [net_.chunk_parameters(k) for k in range(2)]
            for params in groups:
                torch.nn.utils.clip_grad_norm_(params, 0.05)
            opt_.step()
            by_hand.append(list(net_.parameters()))
        for ours, theirs in zip(steps.after[step], by_hand[0]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
        assert max(float((a - b.detach()).abs().max()) for a, b in zip(steps.after[step], by_hand[1])) > 1e-5


def test_ewc_penalty_is_zero_at_the_switch_and_grows_with_drift():
    net = tiny_net()
    x = torch.randint(16, (4, 9), generator=torch.Generator().manual_seed(1))
    params = dict(net.gpt.blocks[0].named_parameters())
    fisher = FisherDiagonal(params, {0: list(params)}, "empirical")
    _, logits = net(x[:, :-1])[0]
    fisher.add(0, [(logits.flatten(0, 1), x[:, 1:].flatten())])
    ewc = EWC(params, fisher.result())
    assert all((f >= 0).all() for f in ewc.fisher.values()) and any(f.sum() > 0 for f in ewc.fisher.values())
    assert float(ewc.penalty(1.0).detach()) == 0.0
    penalties = []
    for eps in (0.01, 0.02, 0.04):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ewc.anchor[n] + eps)
        penalties.append(float(ewc.penalty(1.0).detach()))
    assert 0 < penalties[0] < penalties[1] < penalties[2]
    assert penalties[1] / penalties[0] == pytest.approx(4.0, rel=1e-3)  # quadratic in the drift


def softmax_regression(n=2000, d=3, classes=5, seed=0):
    """Logits z = W x for n samples x ~ N(0, I): W (classes, d), x (n, d), labels (n,) not from the model."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(classes, d, generator=g))
    x = torch.randn(n, d, generator=g)
    return W, x, torch.randint(classes, (n,), generator=g)


def test_fisher_of_softmax_regression_matches_its_closed_form():
    W, x, y = softmax_regression()
    p = torch.softmax(x @ W.detach().T, dim=-1)  # (n, classes)
    # grad_W log p(y | x) = (onehot(y) - p) x^T; its square averaged over samples, and its expectation over y ~ p
    empirical = (((torch.nn.functional.one_hot(y, 5) - p)[:, :, None] * x[:, None, :]) ** 2).mean(0)
    true = (p * (1 - p))[:, :, None].mul(x[:, None, :] ** 2).mean(0)

    def estimate(kind, draws=1):
        fisher = FisherDiagonal({"W": W}, {0: ["W"]}, kind, rows=50)
        g = torch.Generator().manual_seed(1)
        for _ in range(draws):
            for i in range(0, len(x), 50):  # groups of samples; each sample is its own row of the batched backward
                fisher.add(0, [(x[i:i + 50] @ W.T, y[i:i + 50])], g)
        return fisher.result()["W"]

    torch.testing.assert_close(estimate("empirical"), empirical, rtol=1e-5, atol=1e-7)
    errors = [float(((estimate("true", draws) - true).abs() / true).max()) for draws in (1, 50)]
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3, errors  # Monte Carlo error ~ 1/sqrt(draws)
    # labels that do not come from the model make the empirical Fisher another matrix
    assert float(((empirical - true).abs() / true).max()) > 0.2


def test_fisher_is_a_per_token_mean_per_loss_summed_over_losses():
    W, x, y = softmax_regression(n=300)
    a, b = slice(0, 100), slice(100, 300)

    def fisher_of(*groups, reach=None):
        fisher = FisherDiagonal({"W": W}, reach or {0: ["W"]}, "empirical")
        for key, rows in groups:
            fisher.add(key, [(x[rows] @ W.T, y[rows])])
        return fisher.result()["W"]

    fa, fb, fab = fisher_of((0, a)), fisher_of((0, b)), fisher_of((0, a), (0, b))
    torch.testing.assert_close(fisher_of((0, a), (0, a)), fa)  # a mean over tokens, not a sum
    torch.testing.assert_close(fab, (100 * fa + 200 * fb) / 300)  # every token weighs the same
    # two losses reaching one parameter (an overlapped block): the sum of their own means
    torch.testing.assert_close(fisher_of((0, a), (1, b), reach={0: ["W"], 1: ["W"]}), fa + fb)


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_fisher_tokens_are_the_tokens_the_local_loss_scores(make_cfg, objective):
    """Each token is one sample whose log-likelihood is its share of the loss: -mean over tokens = the loss
    (for span, MLM + SBO: both predictions of a masked token make one sample)."""
    run = build(make_cfg("chunks=2", f"objective={objective}"))
    module = run.module
    batch = run.datamodule.train_dataloader().dataset.batch(0)
    prepared = module.objective.prepare(batch, torch.Generator().manual_seed(0))
    fisher = FisherDiagonal({}, {}, "empirical")
    for k, (h, logits) in enumerate(module.net(prepared.idx)):
        terms = chunk_token_terms(module.net, k, h, logits, prepared)
        assert len(terms) == (2 if objective == "span" else 1)
        s = fisher.log_likelihoods(terms)
        assert s.shape == ((prepared.targets != IGNORE).sum(),)
        torch.testing.assert_close(-s.mean(), module.chunk_loss(k, h, logits, prepared))


def test_ewc_in_a_run_starts_at_zero_and_anchors_chunk_one(make_cfg):
    cfg = make_cfg("chunks=2", "switch.at=0.5", "switch.ewc_lambda=100")
    run, _ = fit(cfg)
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tb"))
    acc.Reload()
    penalty = [e.value for e in acc.Scalars("train/ewc_penalty")]
    assert [e.step for e in acc.Scalars("train/ewc_penalty")] == [3, 4, 5]  # the global steps
    assert penalty[0] == 0 and penalty[-1] > 0  # zero at the anchor, then growing as chunk one moves
    assert set(run.module.ewc.fisher) == {n for n, _ in earlier_chunk_params(run.module.net).items()}


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_ewc_fisher_leaves_the_runs_batches_and_dropout_alone(make_cfg, objective):
    # 6 steps, switch at step 3: the Fisher reads batches 3, 4 and 5, which the run then trains on as usual.
    # The penalty and its gradient are 0 at the anchor, so the step at the switch moves every parameter as
    # without EWC, and the next step's loss is the same too unless the estimate drew from the run's random
    # stream (dropout) or its batches.
    common = ["chunks=2", "model.dropout=0.1", "switch.at=0.5", f"objective={objective}"]
    ewc, rec = fit(make_cfg(*common, "switch.ewc_lambda=100", "switch.fisher_batches=3"))
    _, plain = fit(make_cfg(*common))
    assert rec.losses[:5] == plain.losses[:5]
    assert rec.losses[5] != plain.losses[5]  # the anchor pulls from the step after the switch on
    module = ewc.module
    windows = ewc.datamodule.train_dataloader().dataset
    targets = [module.objective.prepare(windows.batch(n), module.mask_generator(n, train=True)).targets
               for n in (3, 4, 5)]
    scored = sum(int((t != IGNORE).sum()) for t in targets)  # clm: every position; mlm: the masked ones
    assert module.ewc.tokens == {0: scored}
    assert objective == "mlm" or scored == 3 * 8 * 16


def scalars(cfg, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_resume_after_the_switch_restores_the_ewc_anchor(make_cfg):
    # switch at step round(0.3 x 6) = 2; the checkpoint at step 3 holds the Fisher and the anchor
    common = ["chunks=2", "model.dropout=0.1", "switch.at=0.3", "switch.ewc_lambda=1000"]
    straight = make_cfg(*common)
    train(straight)
    crashed = make_cfg(*common, "+callbacks.crash._target_=conftest.CrashAt", "+callbacks.crash.step=4")
    with pytest.raises(RuntimeError, match="planted failure at step 4"):
        train(crashed)
    resumed = make_cfg(*common, f"ckpt_path={Path(crashed.paths.output_dir) / 'checkpoints' / 'last.ckpt'}")
    train(resumed)
    for tag in ("train/loss/chunk2", "train/ewc_penalty"):
        want, got = (scalars(c, tag) for c in (straight, resumed))
        assert sorted(got) == [3, 4, 5]  # the resumed run's steps, all global
        for step, value in got.items():
            assert value == pytest.approx(want[step], rel=1e-6, abs=0), f"{tag} at step {step + 1} differs"
    assert scalars(resumed, "train/ewc_penalty")[5] > 0


class SaveFisher(L.Callback):
    """Writes each process's EWC Fisher, once it exists, to ``<folder>/rank<r>.pt``."""

    def __init__(self, folder):
        self.folder, self.saved = Path(folder), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.ewc is not None and not self.saved:
            torch.save(pl_module.ewc.fisher, self.folder / f"rank{trainer.global_rank}.pt")
            self.saved = True


def test_ewc_fisher_under_ddp_is_the_combined_batchs_on_every_rank(make_cfg, tmp_path):
    common = ["chunks=2", "objective=mlm", "switch.at=0.5", "switch.ewc_lambda=100", "switch.fisher_batches=2"]
    single = build(make_cfg(*common, "data.batch_size=8"))
    single.trainer.fit(single.module, datamodule=single.datamodule)
    ddp = build(make_cfg(*common, "data.batch_size=4", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                         "trainer.strategy.start_method=spawn"))
    ddp.trainer.callbacks.append(SaveFisher(tmp_path))
    ddp.trainer.fit(ddp.module, datamodule=ddp.datamodule)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, f in single.module.ewc.fisher.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the ranks' Fishers differ"
        torch.testing.assert_close(ranks[0][name], f, rtol=1e-4, atol=1e-9, msg=name)  # same tokens, same draws


def test_zero_loss_weight_freezes_that_chunk(make_cfg):
    cfg = make_cfg("chunks=2", "loss_weights=[0,1]", "mode=sequential")
    run = build(cfg)
    before = [[p.detach().clone() for p in run.module.net.chunk_parameters(k)] for k in range(2)]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    after = [list(run.module.net.chunk_parameters(k)) for k in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))  # weight 0: chunk 1 never moves
    assert not all(torch.equal(a, b) for a, b in zip(before[1], after[1]))  # chunk 2 trains on its own input


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["chunks=2", "overlap=3"], ["overlap=3", "overlap<=2"]),
        (["chunks=1", "overlap=1"], ["overlap=1", "two chunks"]),
        (["chunks=2", "overlap=-1"], ["overlap=-1"]),
        (["chunks=2", "interlock=0"], ["interlock=0", "at least 1"]),
        (["chunks=2", "overlap=1", "interlock=2"], ["overlap=1", "interlock=2", "pass one of them"]),
        (["switch.at=0"], ["switch.at=0", "(0, 1]"]),
        (["switch.at=1.5"], ["switch.at=1.5", "(0, 1]"]),
        (["switch.fisher=fisherman"], ["switch.fisher=fisherman", "true", "empirical"]),
        (["switch.fisher_batches=0"], ["switch.fisher_batches=0", "at least 1"]),
        (["loss_weights=[1,1,1]"], ["loss_weights=[1.0, 1.0, 1.0]", "2 non-negative"]),
        (["loss_weights=[-1,1]"], ["loss_weights=[-1,1]", "at least 0"]),
        (["objective=mlm", "model.causal=true"], ["model.causal=True", "objective=mlm", "bidirectional"]),
        (["objective=span", "objective.causal=true"], ["objective=span", "bidirectional"]),
        (["objective.causal=false"], ["objective=clm", "causal"]),
    ],
    ids=lambda o: ",".join(o) if isinstance(o, list) and "=" in o[0] else None,
)
def test_bad_variant_settings_fail_before_training(make_cfg, overrides, expected):
    with pytest.raises(ConfigError) as info:
        build(make_cfg(*overrides))
    msg = str(info.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("arg", ["head=nonesuch", "objective=nonesuch", "objective=clm,nonesuch", "+head=nonesuch"])
def test_unknown_head_or_objective_names_the_options(arg):
    group = arg.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError) as info:
        check_group_choices(["chunks=2", arg])
    msg = str(info.value)
    assert "\n" not in msg and f"{group}=nonesuch" in msg
    options = {"head": "block, linear, mlp", "objective": "clm, mlm, span"}[group]
    assert f"choose one of {options}" in msg, msg


@pytest.mark.parametrize("args", [["head=mlp"], ["objective=clm,mlm,span", "chunks=1,2"], ["head=null"],
                                  ["objective=choice(clm,mlm)"], ["model.n_layer=2", "hydra.run.dir=x"]])
def test_known_options_and_other_overrides_pass_the_group_check(args):
    check_group_choices(args)


def test_run_py_names_the_options_of_an_unknown_head_in_one_line():
    proc = subprocess.run([sys.executable, "run.py", "head=nonesuch"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == ("error: head=nonesuch is not an option of the head group; choose one of block, linear, "
                        "mlp (the files in conf/head/).")
