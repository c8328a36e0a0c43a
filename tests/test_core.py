"""Invariants of the chunked model itself: gradient isolation and activation memory."""

import pytest
import torch
import torch.nn.functional as F

from locallearn.chunked import ChunkedGPT
from locallearn.chunking import ChunkPlan
from locallearn.execution import joint_step, sequential_step
from locallearn.heads import LinearHead
from locallearn.memory import SavedTensorMeter
from locallearn.model import GPT, GPTConfig

TINY = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16, vocab_size=32)


def make_net(cfg=TINY, chunks=2, seed=0, overlap=0):
    torch.manual_seed(seed)
    return ChunkedGPT(GPT(cfg), ChunkPlan.build(cfg.n_layer, chunks, overlap=overlap), LinearHead)


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def chunk_loss(targets):
    return lambda k, h, logits: lm_loss(logits, targets)


def batch(cfg=TINY, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(cfg.vocab_size, (B, cfg.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_local_loss_reaches_only_its_chunk(chunks):
    net = make_net(chunks=chunks)
    idx, targets = batch()
    owner = {id(p): k for k in range(chunks) for p in net.chunk_parameters(k)}
    assert len(owner) == sum(1 for _ in net.parameters()), "every parameter belongs to exactly one chunk"
    for k in range(chunks):
        net.zero_grad(set_to_none=True)
        _, logits = net(idx)[k]
        lm_loss(logits, targets).backward()
        for name, p in net.named_parameters():
            if owner[id(p)] == k:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} of chunk {k + 1} got no gradient"
            else:
                assert p.grad is None, f"chunk {k + 1}'s loss leaked into {name} (chunk {owner[id(p)] + 1})"


def test_embedding_belongs_to_chunk_one_and_lm_head_to_the_last():
    net = make_net(chunks=4)
    first, last = set(map(id, net.chunk_parameters(0))), set(map(id, net.chunk_parameters(3)))
    assert id(net.gpt.wte.weight) in first and id(net.gpt.wpe.weight) in first
    assert id(net.gpt.lm_head.weight) in last and id(net.gpt.ln_f.weight) in last
    assert len(net.aux_heads) == 3


def test_one_chunk_is_the_plain_model():
    net = make_net(chunks=1)
    idx, _ = batch()
    ((_, logits),) = net(idx)
    torch.testing.assert_close(logits, net.gpt(idx), rtol=0, atol=0)


def test_joint_and_sequential_give_the_same_gradients():
    idx, targets = batch()
    grads = {}
    for name, step in (("joint", joint_step), ("sequential", sequential_step)):
        net = make_net(chunks=3)
        losses = step(net, idx, chunk_loss(targets), lambda loss: loss.backward(), [1.0] * 3)
        grads[name] = ([p.grad.clone() for p in net.parameters()], torch.stack(losses))
    for gj, gs in zip(grads["joint"][0], grads["sequential"][0]):
        torch.testing.assert_close(gj, gs, rtol=0, atol=0)
    torch.testing.assert_close(grads["joint"][1], grads["sequential"][1], rtol=0, atol=0)


def saved_bytes(chunks, step, cfg, B=12):
    net = make_net(cfg, chunks=chunks)
    idx, targets = batch(cfg, B=B)
    with SavedTensorMeter(net.parameters()) as meter:
        step(net, idx, chunk_loss(targets), lambda loss: loss.backward(), [1.0] * chunks)
    assert meter.live == 0, "every saved tensor is released after backward"
    return meter.peak


def test_sequential_activation_memory_shrinks_with_chunks():
    small = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)  # model=small, shakespeare vocab
    k1 = saved_bytes(1, sequential_step, small)
    k2 = saved_bytes(2, sequential_step, small)
    k4 = saved_bytes(4, sequential_step, small)
    assert k4 <= 0.4 * k1, f"K=4 saves {k4} bytes, more than 0.4 x K=1 ({k1})"
    assert k4 < k2 < k1
    # joint mode keeps every chunk's graph alive: no saving, only the auxiliary heads' extra cost
    assert saved_bytes(4, joint_step, small) >= k1


def test_meter_counts_activations_not_parameters():
    lin = torch.nn.Linear(100, 100)
    x = torch.randn(50, 100, requires_grad=True)
    with SavedTensorMeter(lin.parameters()) as meter:
        y = torch.relu(lin(x)).sum()
        assert meter.live == 2 * 50 * 100 * 4  # the linear's input and the relu's output, fp32
        y.backward()
    assert meter.live == 0 and meter.peak == 2 * 50 * 100 * 4


@pytest.mark.parametrize(("chunks", "overlap"), [(2, 1), (4, 1), (2, 2)])
def test_overlap_routes_gradient_to_both_losses_and_nothing_below_the_cut(chunks, overlap):
    cfg = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16, vocab_size=32)
    net = make_net(cfg, chunks=chunks, overlap=overlap)
    idx, targets = batch(cfg)
    block_of = {id(p): i for i, b in enumerate(net.gpt.blocks) for p in b.parameters()}
    for k, chunk in enumerate(net.plan):
        net.zero_grad(set_to_none=True)
        _, logits = net(idx)[k]
        lm_loss(logits, targets).backward()
        reached = {id(p) for p in net.trained_parameters(k)}
        for name, p in net.named_parameters():
            if id(p) in reached:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"chunk {k + 1}'s loss missed {name}"
            else:
                assert p.grad is None, f"chunk {k + 1}'s loss reached {name} below its cut"
        trained_blocks = {block_of[i] for i in reached if i in block_of}
        assert trained_blocks == set(chunk.trained)
        if k:
            assert chunk.cut == chunk.start - overlap
    # an overlapped block learns from exactly two losses
    both = [k for k in range(chunks) if set(net.plan[k].trained) & {net.plan[0].end - 1}]
    assert both == [0, 1]


def test_overlap_does_not_change_what_is_handed_on():
    cfg = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16, vocab_size=32)
    plain, over = make_net(cfg, chunks=4), make_net(cfg, chunks=4, overlap=1)
    idx, _ = batch(cfg)
    for (h0, l0), (h1, l1) in zip(plain(idx), over(idx)):
        torch.testing.assert_close(h0, h1, rtol=0, atol=0)
        torch.testing.assert_close(l0, l1, rtol=0, atol=0)


def test_global_mode_lets_the_last_loss_reach_every_chunk():
    net = make_net(chunks=3)
    idx, targets = batch()
    net.local = False
    _, logits = net(idx)[-1]
    lm_loss(logits, targets).backward()
    assert net.gpt.wte.weight.grad is not None and net.gpt.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.aux_heads.parameters())
