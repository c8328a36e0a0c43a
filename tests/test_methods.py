"""Methods that send downstream information back (method=synthetic, delayed, interlock): what each chunk's gradient
is, that every mode makes the same updates, that runs resume exactly, and what is refused."""

import copy
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from locallearn.build import make_method
from locallearn.config import instantiate
from locallearn.errors import ConfigError
from locallearn.model.chunked import make_net
from locallearn.runner import train
from locallearn.training.callbacks import CHARTS
from locallearn.training.methods import DelayedGradients, SyntheticGradients
from locallearn.training.update import joint_backward, sequential_backward
from tests.test_pipeline import assert_same_state, checkpoint, train_losses


def small_net(make_cfg, *overrides, dropout=0.0):
    cfg = make_cfg("chunks=3", "model.n_layer=3", f"model.dropout={dropout}", *overrides)
    objective = instantiate(cfg.objective)
    torch.manual_seed(0)
    return make_net(cfg, objective, 40), objective, cfg


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (4, 17), generator=g) for _ in range(n)]


def loss_fn_for(objective, net, idx):
    """A clm batch of ``idx`` and the loss function of its chunks."""
    prepared = objective.prepare(idx, torch.Generator().manual_seed(0))
    return prepared, lambda k, h, logits: objective.loss(logits, h, prepared, None)


def grads_of(net, backward_fn, idx, objective, method):
    """Each parameter's gradient after one backward pass (the parameters left as they are)."""
    net.zero_grad(set_to_none=True)
    prepared, loss_fn = loss_fn_for(objective, net, idx)
    backward_fn(net, prepared.idx, loss_fn, torch.Tensor.backward, [1.0] * len(net), method=method)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_delayed_gradient_is_the_next_losses_gradient_of_the_step_before(make_cfg, dropout):
    """With the weights unchanged, step 2's delayed term is the gradient of chunk k+1's loss on batch 1 w.r.t. chunk
    k's blocks, through the very dropout masks of batch 1's forward (recomputed from the saved input)."""
    net, objective, _ = small_net(make_cfg, dropout=dropout)
    net.train()
    b1, b2 = batches(2)
    torch.manual_seed(5)
    grads_of(net, sequential_backward, b1, objective, None)
    local2 = grads_of(net, sequential_backward, b2, objective, None)
    torch.manual_seed(5)
    method = DelayedGradients(weight=1.0)
    grads_of(net, sequential_backward, b1, objective, method)
    delayed2 = grads_of(net, sequential_backward, b2, objective, method)  # the replays draw no masks of their own
    # the expected term: batch 1 end to end, under the same masks as its first forward (the same global stream)
    torch.manual_seed(5)
    net.local = False
    prepared, loss_fn = loss_fn_for(objective, net, b1)
    outs = net(prepared.idx)
    net.local = True
    for k in range(len(net) - 1):
        params = [p for m in net.trunk_modules(k) for p in m.parameters()]
        want = torch.autograd.grad(loss_fn(k + 1, *outs[k + 1]), params, retain_graph=True, allow_unused=True)
        names = {id(p): n for n, p in net.named_parameters()}
        for p, g in zip(params, want):
            n = names[id(p)]
            torch.testing.assert_close(delayed2[n] - local2[n], g if g is not None else torch.zeros_like(p),
                                       rtol=1e-4, atol=1e-7, msg=f"chunk {k + 1}: {n}")
    last = [n for n, p in net.named_parameters() if any(p is q for q in net.chunk_parameters(len(net) - 1))]
    for n in last:  # the last chunk has nothing to receive
        torch.testing.assert_close(delayed2[n], local2[n], rtol=0, atol=0)


def test_synthetic_gradients_start_as_local_learning_and_regress_onto_the_true_message(make_cfg):
    net, objective, _ = small_net(make_cfg, "method=synthetic")
    b1, b2 = batches(2)
    method = SyntheticGradients(weight=1.0)
    local1 = grads_of(net, sequential_backward, b1, objective, None)
    synth1 = grads_of(net, sequential_backward, b1, objective, method)
    for n, g in local1.items():  # the predictors start at zero: the first step is local learning's
        torch.testing.assert_close(synth1[n], g, rtol=0, atol=0)
    # the message chunk k holds is the gradient of chunk k+1's objective w.r.t. its input, as autograd computes it
    prepared, loss_fn = loss_fn_for(objective, net, b1)
    x = prepared.idx
    for k in range(len(net)):
        x, h, logits = net.forward_chunk(k, x, grad_input=True)
        if k:
            (g,) = torch.autograd.grad(loss_fn(k, h, logits), x["input"])
            torch.testing.assert_close(method.chunks[k - 1]["grad"], g, rtol=1e-5, atol=1e-9)
    # step 2 regresses the predictors: they get gradients, and the cosine of their guess is recorded per boundary
    synth2 = grads_of(net, sequential_backward, b2, objective, method)
    for k in range(len(net) - 1):
        assert any(synth2[n].abs().sum() > 0 for n, _ in net.predictors[k].named_parameters(prefix=f"predictors.{k}"))
    metrics = method.take_metrics()
    assert sorted(metrics) == [f"train/synthetic/{m}/chunk{k}" for m in ("cosine", "norm_ratio") for k in (1, 2)]
    assert all(-1 <= float(v) <= 1 for n, v in metrics.items() if "cosine" in n)


@pytest.mark.parametrize("method_cls", [SyntheticGradients, DelayedGradients])
def test_joint_and_sequential_make_the_same_gradients_with_a_method(make_cfg, method_cls):
    net, objective, _ = small_net(make_cfg, "method=synthetic")
    net_b = copy.deepcopy(net)
    seq, joint = method_cls(weight=0.5), method_cls(weight=0.5)
    for idx in batches(3):
        a = grads_of(net, sequential_backward, idx, objective, seq)
        b = grads_of(net_b, joint_backward, idx, objective, joint)
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-8, msg=n)
        with torch.no_grad():  # a step, so that the next step's terms see new weights
            for p, q in zip(net.parameters(), net_b.parameters()):
                p -= 0.1 * a[[n for n, r in net.named_parameters() if r is p][0]]
                q.copy_(p)


# the linear predictor runs the same code paths as the MLP one: with -m slow only
METHODS = [["method=synthetic"], ["method=delayed"],
           pytest.param(["method=synthetic", "method.predictor.hidden=0"], marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", METHODS, ids=["synthetic", "delayed", "synthetic-linear"])
def test_every_mode_makes_the_same_updates_with_a_method(make_cfg, method):
    seq = make_cfg("chunks=3", "mode=sequential", *method)
    joint = make_cfg("chunks=3", "mode=joint", *method)
    pipe = make_cfg("chunks=3", "mode=pipeline", *method)
    summaries = [train(c) for c in (seq, joint, pipe)]
    assert summaries[2]["val_loss"] == pytest.approx(summaries[0]["val_loss"], abs=1e-6)
    assert summaries[1]["val_loss"] == pytest.approx(summaries[0]["val_loss"], abs=1e-5)
    assert_same_state(checkpoint(seq), checkpoint(pipe))
    assert_same_state(checkpoint(seq), checkpoint(joint), atol=1e-5)
    local = make_cfg("chunks=3", "mode=sequential")
    train(local)
    assert train_losses(local, 3) != pytest.approx(train_losses(seq, 3), abs=1e-6)  # the method changed training
    if "method=synthetic" in method:  # the cosines reach TensorBoard from every process, from the second step on
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        for cfg in (seq, pipe):
            acc = EventAccumulator(str(cfg.paths.output_dir) + "/tb", size_guidance={"scalars": 0})
            acc.Reload()
            tags = [t for t in acc.Tags()["scalars"] if t.startswith("train/synthetic/")]
            assert sorted(tags) == [f"train/synthetic/{m}/chunk{k}" for m in ("cosine", "norm_ratio") for k in (1, 2)]
            for tag in tags:  # each on its chart in TensorBoard's Custom Scalars
                assert sum(re.match(regex, tag) is not None for regex in CHARTS.values()) == 1, tag
            assert [e.step for e in acc.Scalars("train/synthetic/cosine/chunk2")] == [1, 2, 3, 4, 5]
        from locallearn.analysis.compare import write_report
        write_report([seq.paths.output_dir, local.paths.output_dir], seq.paths.output_dir + "_compare")
        assert Path(seq.paths.output_dir + "_compare", "synthetic_cosines.png").stat().st_size > 0
        assert ({e.step: e.value for e in acc.Scalars("train/synthetic/cosine/chunk2")}
                == pytest.approx({e.step: e.value for e in EventAccumulator(str(seq.paths.output_dir) + "/tb")
                                  .Reload().Scalars("train/synthetic/cosine/chunk2")}, abs=1e-5))


def test_a_chunk_that_does_not_train_sends_no_message_in_any_mode(make_cfg):
    """loss_weights=[1,1,0]: chunk 3 sends nothing back; chunk 2 applies nothing, in one process as in the pipeline."""
    seq = make_cfg("chunks=3", "mode=sequential", "method=delayed", "loss_weights=[1,1,0]")
    pipe = make_cfg("chunks=3", "mode=pipeline", "method=delayed", "loss_weights=[1,1,0]")
    train(seq), train(pipe)
    assert_same_state(checkpoint(seq), checkpoint(pipe))
    assert "grad" not in checkpoint(seq)["method"][1]


@pytest.mark.parametrize("method, mode", [("synthetic", "sequential"), ("delayed", "sequential"),
                                          ("delayed", "pipeline"),
                                          pytest.param("synthetic", "pipeline", marks=pytest.mark.slow)])  # 14 s
def test_a_run_with_a_method_resumes_exactly(make_cfg, method, mode):
    dropout = ["model.dropout=0.1"] if mode == "sequential" else []
    args = ["chunks=3", f"mode={mode}", f"method={method}", *dropout]
    straight = make_cfg(*args)
    train(straight)
    crashed = make_cfg(*args, "+callbacks.crash._target_=conftest.CrashAt", "+callbacks.crash.step=4")
    with pytest.raises(RuntimeError, match="planted failure at step 4"):
        train(crashed)
    last = f"{crashed.paths.output_dir}/checkpoints/last.ckpt"
    assert checkpoint(crashed)["method"], "the checkpoint holds the method's state"
    resumed = make_cfg(*args, f"ckpt_path={last}")
    train(resumed)
    assert_same_state(checkpoint(straight), checkpoint(resumed))


@pytest.mark.parametrize("overrides, message", [
    (["method=synthetic", "overlap=1"], "method=synthetic sends gradients back across the cut, and overlap=1"),
    (["method=delayed", "interlock=2"], "method=delayed sends gradients back across the cut, and interlock=2"),
    (["method=delayed", "switch.at=0.5"], "switch.at=0.5 removes the cut"),
    (["method=synthetic", "method.weight=-1"], "method.weight=-1"),
    (["method=synthetic", "method.predictor.hidden=1.5"], "method.predictor.hidden=1.5"),
])
def test_what_a_method_cannot_run_with_is_refused_in_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
        train(make_cfg("chunks=3", *overrides))
    assert "\n" not in str(e.value)


def test_method_interlock_is_two_wise_interlocking(make_cfg):
    cfg = make_cfg("chunks=4", "model.n_layer=4", "method=interlock")
    assert cfg.interlock == 2 and make_method(cfg).name == "local"
    assert OmegaConf.select(make_cfg("chunks=4", "method=interlock", "interlock=3"), "interlock") == 3


def test_tradeoff_puts_kept_against_the_memory_each_way_of_training_holds(tmp_path):
    """analysis/tradeoff.py: kept from the sweep, memory measured on each group's own run config."""
    import json

    from omegaconf import OmegaConf

    from analysis.tradeoff import main
    from tests.conftest import compose_config
    from tests.test_compare import depth_sweep

    losses = {"end_to_end": [1.0, 1.1, 1.2], "shallow1": [3.0, 3.1, 3.2], "chunked": [2.0, 2.1, 2.2],
              "delayed": [1.5, 1.6, 1.7], "synthetic": [2.5, 2.6, 2.7]}
    root = depth_sweep(tmp_path / "m", losses)
    for run in root.iterdir():  # each fake run gets the config its variant composes (4 blocks of model=tiny)
        variant = run.name.split("variant=")[1].split(",")[0]
        depth = [] if variant.startswith("shallow") else ["model.n_layer=4"]  # shallow variants set their own
        cfg = compose_config(run, *depth, f"variant={variant}")
        OmegaConf.save(cfg, run / "config.yaml")
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps(summary | {"vocab_size": 40}))
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    points = {p["name"].split(" ")[0]: p for p in json.loads((tmp_path / "out" / "tradeoff.json").read_text())}
    assert points["variant=end_to_end"]["memory"] == 1.0 and points["variant=end_to_end"]["loss"]["kept"] == 100
    assert points["variant=chunked"]["loss"]["kept"] == pytest.approx(50)  # (3.0 - 2.0) / (3.0 - 1.0)
    # one block per chunk holds what the one-block model holds; delayed gradients replay after the chunk's graph
    # is freed, and hold each chunk's input and message between steps: (B, T) ids and 5 (B, T, C) floats
    chunked, delayed = points["variant=chunked"], points["variant=delayed"]
    e2e, shallow = points["variant=end_to_end"], points["variant=shallow1"]
    assert chunked["saved_peak"] == shallow["saved_peak"] < e2e["saved_peak"]
    assert delayed["saved_peak"] == chunked["saved_peak"] and chunked["held"] == 0
    B, T, C = cfg.data.batch_size, cfg.data.block_size, cfg.model.n_embd
    assert delayed["held"] == B * T * 8 + 5 * B * T * C * 4
    assert points["variant=synthetic"]["held"] == 6 * B * T * C * 4  # each output and its message
    assert (tmp_path / "out" / "kept_vs_memory.png").stat().st_size > 0
    assert "| variant=delayed | 4 | 75% [" in (tmp_path / "out" / "tradeoff.md").read_text()
