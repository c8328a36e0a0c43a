"""Variants through the real Hydra config: heads, objectives, greedy, overlap, loss weights, switch, EWC."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.chunked import ChunkedGPT
from locallearn.chunking import ChunkPlan
from locallearn.config import PROJECT_ROOT, check_group_choices
from locallearn.errors import ConfigError
from locallearn.heads import LinearHead
from locallearn.model import GPT, GPTConfig
from locallearn.switch import EWC
from locallearn.train import build, quiet_lightning, train

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
        ["chunking=greedy"],
        ["chunks=4", "overlap=1"],
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
    greedy, rec_g = fit(make_cfg("chunking=greedy"))
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


def test_ewc_penalty_is_zero_at_the_switch_and_grows_with_drift():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=16)
    net = ChunkedGPT(GPT(cfg), ChunkPlan.build(2, 2), LinearHead)
    x = torch.randint(16, (4, 9))
    params = dict(net.gpt.blocks[0].named_parameters())

    def losses():
        for b in range(4):
            _, logits = net(x[b:b + 1, :-1])[0]
            yield torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[b:b + 1, 1:].flatten())

    ewc = EWC.estimate(params, losses())
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


def test_ewc_in_a_run_starts_at_zero_and_anchors_chunk_one(make_cfg):
    cfg = make_cfg("chunks=2", "switch.at=0.5", "switch.ewc_lambda=100")
    run, _ = fit(cfg)
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tb"))
    acc.Reload()
    penalty = [e.value for e in acc.Scalars("train/ewc_penalty")]
    assert [e.step for e in acc.Scalars("train/ewc_penalty")] == [3, 4, 5]  # the global steps
    assert penalty[0] == 0 and penalty[-1] > 0  # zero at the anchor, then growing as chunk one moves
    assert set(run.module.ewc.fisher) == {n for n, _ in run.module._earlier_chunk_params().items()}


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
        (["switch.at=0"], ["switch.at=0", "(0, 1]"]),
        (["switch.at=1.5"], ["switch.at=1.5", "(0, 1]"]),
        (["loss_weights=[1,1,1]"], ["loss_weights=[1.0, 1.0, 1.0]", "2 non-negative"]),
        (["loss_weights=[-1,1]"], ["loss_weights=[-1.0, 1.0]", "non-negative"]),
        (["objective=mlm", "model.causal=true"], ["model.causal=True", "objective=mlm", "bidirectional"]),
        (["objective=span", "objective.causal=true"], ["objective=span", "bidirectional"]),
        (["objective.causal=false"], ["objective=clm", "causal"]),
        (["chunking=greedy", "chunks=2"], ["chunking=greedy", "chunks=2"]),
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
