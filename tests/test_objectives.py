"""Objectives: masking statistics, seeding, data-parallel slices, batches without targets, and the
span-boundary objective's inputs."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from locallearn.errors import ConfigError
from locallearn.model.gpt import GPTConfig
from locallearn.model.objectives import IGNORE, CausalLM, MaskedLM, Prepared, SpanMasking, span_lengths
from locallearn.runner import build, train
from locallearn.training.callbacks import CHARTS

V = 50


def truncated_geometric(p, max_span):
    """SpanBERT's span-length law, written out here from its definition: P(l) = p (1-p)^(l-1) / Z for
    l = 1..max_span, with Z = P(l <= max_span) of the untruncated geometric."""
    weights = [p * (1 - p) ** (length - 1) for length in range(1, max_span + 1)]
    return [w / sum(weights) for w in weights]


def windows(n_batches=40, B=16, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(V, (B, T + 1), generator=g) for _ in range(n_batches)]


def bound(objective):
    objective.bind(V)
    return objective


def test_clm_predicts_the_next_token():
    x = torch.arange(10).view(1, 10)
    p = CausalLM().prepare(x)
    assert p.idx.tolist() == [list(range(9))] and p.targets.tolist() == [list(range(1, 10))]


def test_mlm_selects_15_percent_and_corrupts_80_10_10():
    obj = bound(MaskedLM())
    g = torch.Generator().manual_seed(0)
    selected = masked = randomized = kept = total = 0
    for x in windows():
        p = obj.prepare(x, g)
        orig = x[:, :-1]
        sel = p.targets != IGNORE
        assert torch.equal(p.targets[sel], orig[sel]) and torch.equal(p.idx[~sel], orig[~sel])
        total += sel.numel()
        selected += int(sel.sum())
        masked += int((p.idx[sel] == obj.mask_id).sum())
        kept += int((p.idx[sel] == orig[sel]).sum())
        randomized += int(((p.idx[sel] != orig[sel]) & (p.idx[sel] != obj.mask_id)).sum())
    assert selected / total == pytest.approx(0.15, abs=0.01)
    assert masked / selected == pytest.approx(0.8, abs=0.02)
    # a random replacement equals the original with probability 1/V, which then counts as kept
    assert randomized / selected == pytest.approx(0.1 * (1 - 1 / V), abs=0.02)
    assert kept / selected == pytest.approx(0.1 + 0.1 / V, abs=0.02)


def spans_of(p):
    """(b, start, end) of every span, read off the span boundaries."""
    out = set()
    for b, t in zip(*(p.span_left >= 0).nonzero(as_tuple=True)):
        out.add((int(b), int(p.span_left[b, t]) + 1, int(p.span_right[b, t]) - 1))
    return sorted(out)


def test_span_masking_statistics():
    obj = bound(SpanMasking())
    g = torch.Generator().manual_seed(1)
    lengths, covered, total, per_span = [], 0, 0, {"mask": 0, "random_or_kept": 0}
    for x in windows(T=256):
        p = obj.prepare(x, g)
        orig = x[:, :-1]
        sel = p.targets != IGNORE
        covered += int(sel.sum())
        total += sel.numel()
        for b, s, e in spans_of(p):
            assert 1 <= s <= e <= orig.shape[1] - 2  # both boundaries lie inside the window
            assert not sel[b, s - 1] and not sel[b, e + 1]  # and are not masked themselves
            assert p.span_offset[b, s:e + 1].tolist() == list(range(e - s + 1))
            lengths.append(e - s + 1)
            span = p.idx[b, s:e + 1]
            if (span == obj.mask_id).all():
                per_span["mask"] += 1
            else:
                assert not (span == obj.mask_id).any(), "80/10/10 is decided per span, not per token"
                per_span["random_or_kept"] += 1
    assert covered / total == pytest.approx(0.15, abs=0.01)
    n = len(lengths)
    assert per_span["mask"] / n == pytest.approx(0.8, abs=0.02)
    assert max(lengths) <= 10 and min(lengths) >= 1
    # the spans placed in windows keep the truncated law (about 6,000 here: loose tolerances)
    pmf = truncated_geometric(0.2, 10)
    assert sum(lengths) / n == pytest.approx(3.797, abs=0.08)
    assert lengths.count(1) / n == pytest.approx(pmf[0], abs=0.02)
    assert lengths.count(10) / n == pytest.approx(pmf[9], abs=0.01)


def test_span_lengths_follow_spanberts_truncated_geometric():
    n, p, max_span = 200_000, 0.2, 10
    lengths = span_lengths(torch.rand(n, generator=torch.Generator().manual_seed(0)), p, max_span)
    counts = torch.bincount(lengths, minlength=max_span + 1).tolist()
    assert counts[0] == 0 and sum(counts) == n  # every length in 1..max_span
    for length, want in enumerate(truncated_geometric(p, max_span), start=1):
        sigma = math.sqrt(want * (1 - want) / n)
        assert counts[length] / n == pytest.approx(want, abs=5 * sigma), f"P(l={length})"
    # the paper's mean span length (3.8), and the 3% at the cap that clipping would have made 13%
    assert float(lengths.double().mean()) == pytest.approx(3.797, abs=0.02)
    assert counts[max_span] / n == pytest.approx(0.030, abs=0.002)
    exact_mean = sum(length * q for length, q in enumerate(truncated_geometric(p, max_span), start=1))
    assert SpanMasking(geometric_p=p, max_span=max_span).mean_span == pytest.approx(exact_mean, rel=1e-12)
    # degenerate laws: p=1 and max_span=1 give only length 1
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    assert span_lengths(u, 1.0, 10).eq(1).all() and span_lengths(u, 0.2, 1).eq(1).all()


@pytest.mark.parametrize("objective", [MaskedLM, SpanMasking])
def test_masking_is_seeded(objective):
    obj = bound(objective())
    x = windows(n_batches=1)[0]
    a = obj.prepare(x, torch.Generator().manual_seed(5))
    b = obj.prepare(x, torch.Generator().manual_seed(5))
    c = obj.prepare(x, torch.Generator().manual_seed(6))
    assert torch.equal(a.idx, b.idx) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)


def test_span_boundary_objective_sees_only_the_boundaries():
    obj = bound(SpanMasking())
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=V + 1, causal=False)
    sbo = obj.chunk_module(cfg)
    x = windows(n_batches=1, B=4, T=64)[0]
    p = obj.prepare(x, torch.Generator().manual_seed(0))
    h = torch.randn(4, 64, 16)
    before, _ = sbo.inputs(h, p)
    b, s, e = spans_of(p)[0]
    inside = h.clone()
    inside[b, s:e + 1] += 10.0  # every hidden state inside the span changes
    after, _ = sbo.inputs(inside, p)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    boundary = h.clone()
    boundary[b, s - 1] += 10.0
    changed, where = sbo.inputs(boundary, p)
    rows = (where[0] == b) & (where[1] >= s) & (where[1] <= e)
    assert not torch.equal(changed[rows], before[rows]) and torch.equal(changed[~rows], before[~rows])


@pytest.mark.parametrize("objective", [MaskedLM, SpanMasking])
@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_ranks_mask_their_rows_of_the_combined_batch(objective, world):
    # RandomWindows gives rank r rows [r*B, (r+1)*B) of one combined batch; the masks must follow.
    obj = bound(objective())
    x = windows(n_batches=1, B=8, T=64)[0]
    whole = obj.prepare(x, torch.Generator().manual_seed(7))
    B = 8 // world
    parts = [obj.prepare(x[r * B:(r + 1) * B], torch.Generator().manual_seed(7), rank=r, world=world)
             for r in range(world)]
    for name, value in vars(whole).items():
        if value is not None:
            assert torch.equal(torch.cat([getattr(part, name) for part in parts]), value), name
    assert (whole.targets != IGNORE).any()


@pytest.mark.parametrize("objective", [MaskedLM, SpanMasking])
def test_a_batch_without_targets_scores_zero_with_a_finite_zero_gradient(objective):
    obj = bound(objective())
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=V + 1, causal=False)
    module = obj.chunk_module(cfg)
    B, T = 2, 8
    none = torch.full((B, T), -1)
    prepared = Prepared(torch.zeros(B, T, dtype=torch.long), torch.full((B, T), IGNORE),
                        *((none, none, torch.zeros(B, T, dtype=torch.long)) if module is not None else ()))
    logits = torch.randn(B, T, V + 1, requires_grad=True)
    h = torch.randn(B, T, 16, requires_grad=True)
    loss = obj.loss(logits, h, prepared, module)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    for p in module.parameters() if module is not None else []:  # a zero gradient, not a missing one
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_span_masking_places_spans_in_the_shortest_windows_that_hold_one():
    obj = bound(SpanMasking())
    assert obj.prepare(windows(n_batches=1, B=64, T=3)[0], torch.Generator().manual_seed(0)).targets.ne(IGNORE).any()
    assert not obj.prepare(windows(n_batches=1, B=8, T=2)[0], torch.Generator().manual_seed(0)).targets.ne(IGNORE).any()


def test_a_span_run_with_too_short_windows_is_refused_before_any_work(make_cfg):
    with pytest.raises(ConfigError, match=r"^objective=span needs data.block_size >= 3 but got data.block_size=2;"):
        build(make_cfg("objective=span", "data.block_size=2"))


def logged(cfg, prefix: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"] if tag.startswith(prefix)}


def test_span_training_in_short_windows_skips_the_batches_without_targets(make_cfg):
    # 5-token windows: with 8 windows a batch, about one step in four masks nothing at all.
    cfg = make_cfg("objective=span", "chunks=2", "data.block_size=5", "data.val_windows=64", "trainer.max_steps=12",
                   "trainer.val_check_interval=6")
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["diagnostics"]["diverged"] is None
    assert all(math.isfinite(v) for v in summary["val_loss"].values())
    train_loss = logged(cfg, "train/loss/")
    steps = sorted(train_loss["train/loss/chunk2"])
    assert 0 < len(steps) < 12, steps  # some steps had no target: no loss logged for them, not 0 or NaN
    assert all(math.isfinite(v) and v > 0 for curve in train_loss.values() for v in curve.values())
    assert sorted(logged(cfg, "train/lr/")["train/lr/chunk2"]) == list(range(12))  # the other metrics still log
    # a sum of two cross-entropies is not a bits-per-token, so it is named for what it is
    bits = logged(cfg, "val/")
    assert {"val/bits_sum/chunk1", "val/bits_sum/chunk2"} <= set(bits) and not any("bpc" in t for t in bits)
    for tag in (t for t in bits if t.endswith(("/chunk1", "/chunk2"))):  # each lands on exactly one shared chart
        assert sum(re.match(regex, tag) is not None for regex in CHARTS.values()) == 1, tag
    diagnostics = json.loads((Path(cfg.paths.output_dir) / "diagnostics.json").read_text())
    assert diagnostics["status"] == "finished"


def test_a_validation_set_without_any_target_is_refused(make_cfg):
    cfg = make_cfg("objective=span", "data.block_size=3", "data.val_windows=1", "trainer.max_steps=3")
    with pytest.raises(ConfigError, match=r"objective=span put no target in any of the data.val_windows=1 "
                                          r"validation windows of data.block_size=3 tokens") as e:
        train(cfg)
    assert "\n" not in str(e.value)
