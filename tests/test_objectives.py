"""Objectives: masking statistics, seeding, and the span-boundary objective's inputs."""

import pytest
import torch

from locallearn.model import GPTConfig
from locallearn.objectives import IGNORE, CausalLM, MaskedLM, SpanMasking

V = 50


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
    assert sum(lengths) / n == pytest.approx(obj.mean_span, rel=0.03)  # E[min(Geometric(0.2), 10)] = 4.46
    # the length histogram follows the clipped geometric law: P(L = 1) = p, P(L = 10) = (1 - p)^9
    assert lengths.count(1) / n == pytest.approx(0.2, abs=0.02)
    assert lengths.count(10) / n == pytest.approx(0.8**9, abs=0.02)


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
