"""Invariants of the chunked model itself: gradient isolation and activation memory."""

import pytest
import torch
import torch.nn.functional as F

from locallearn.errors import ConfigError
from locallearn.model.chunked import ChunkedGPT
from locallearn.model.gpt import GPT, GPTConfig
from locallearn.model.heads import LinearHead
from locallearn.model.plan import ChunkPlan
from locallearn.training.memory import SavedTensorMeter
from locallearn.training.update import joint_backward, sequential_backward

TINY = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16, vocab_size=32)


def make_net(cfg=TINY, chunks=2, seed=0, overlap=0, interlock=1):
    """``chunks``: K (an even split) or a list of boundaries."""
    torch.manual_seed(seed)
    K, cuts = (None, chunks) if isinstance(chunks, list) else (chunks, None)
    return ChunkedGPT(GPT(cfg), ChunkPlan.build(cfg.n_layer, K, cuts, overlap, interlock), LinearHead)


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


DROPOUT = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16, vocab_size=32, dropout=0.1)


@pytest.mark.parametrize(("cfg", "chunks", "overlap", "interlock"),
                         [(TINY, 3, 0, 1), (DROPOUT, 2, 1, 1), (DROPOUT, 2, 2, 1), (DROPOUT, 4, 1, 1),
                          (DROPOUT, [2, 3], 2, 1), (DROPOUT, 4, 0, 2), (DROPOUT, 4, 0, 4)],
                         ids=["plain", "dropout,chunks=2,overlap=1", "dropout,chunks=2,overlap=2",
                              "dropout,chunks=4,overlap=1", "dropout,boundaries=[2,3],overlap=2",
                              "dropout,chunks=4,interlock=2", "dropout,chunks=4,interlock=4"])
def test_joint_and_sequential_give_the_same_gradients(cfg, chunks, overlap, interlock):
    idx, targets = batch(cfg)
    grads = {}
    for name, step in (("joint", joint_backward), ("sequential", sequential_backward)):
        net = make_net(cfg, chunks=chunks, overlap=overlap, interlock=interlock)  # seeds the RNG: same masks
        losses = step(net, idx, chunk_loss(targets), lambda loss: loss.backward(), [1.0] * len(net))
        grads[name] = ([p.grad.clone() for p in net.parameters()], torch.stack(losses))
    # Bit for bit while no parameter sums more than two losses' gradients (a + b = b + a in floats); three or
    # more are added in another order by one backward of their sum than by one backward each.
    reach = max(sum(p in {id(q) for q in net.trained_parameters(k)} for k in range(len(net)))
                for p in map(id, net.parameters()))
    tol = dict(rtol=0, atol=0) if reach <= 2 else dict(rtol=1e-4, atol=1e-7)
    for gj, gs in zip(grads["joint"][0], grads["sequential"][0]):
        torch.testing.assert_close(gj, gs, **tol)
    torch.testing.assert_close(grads["joint"][1], grads["sequential"][1], rtol=0, atol=0)


def saved_bytes(chunks, step, cfg, B=12, interlock=1):
    net = make_net(cfg, chunks=chunks, interlock=interlock)
    idx, targets = batch(cfg, B=B)
    with SavedTensorMeter(net.parameters()) as meter:
        step(net, idx, chunk_loss(targets), lambda loss: loss.backward(), [1.0] * chunks)
    assert meter.live == 0, "every saved tensor is released after backward"
    return meter.peak


def test_sequential_activation_memory_shrinks_with_chunks():
    small = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)  # model=small, shakespeare vocab
    k1 = saved_bytes(1, sequential_backward, small)
    k2 = saved_bytes(2, sequential_backward, small)
    k4 = saved_bytes(4, sequential_backward, small)
    assert k4 <= 0.4 * k1, f"K=4 saves {k4} bytes, more than 0.4 x K=1 ({k1})"
    assert k4 < k2 < k1
    # joint mode keeps every chunk's graph alive: no saving, only the auxiliary heads' extra cost
    assert saved_bytes(4, joint_backward, small) >= k1
    # n-wise interlocking, sequentially: chunk k's backward holds the n chunks its loss trains
    assert saved_bytes(4, sequential_backward, small, interlock=2) == k2
    assert saved_bytes(4, sequential_backward, small, interlock=4) == k1


def test_meter_counts_activations_not_parameters():
    lin = torch.nn.Linear(100, 100)
    x = torch.randn(50, 100, requires_grad=True)
    with SavedTensorMeter(lin.parameters()) as meter:
        y = torch.relu(lin(x)).sum()
        assert meter.live == 2 * 50 * 100 * 4  # the linear's input and the relu's output, fp32
        y.backward()
    assert meter.live == 0 and meter.peak == 2 * 50 * 100 * 4


@pytest.mark.parametrize(("chunks", "overlap", "interlock"),
                         [(2, 1, 1), (4, 1, 1), (2, 2, 1), ([2, 3], 2, 1), ([3], 3, 1), (4, 0, 2), (4, 0, 3),
                          (2, 0, 2)])
def test_overlap_routes_gradient_to_both_losses_and_nothing_below_the_cut(chunks, overlap, interlock):
    cfg = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16, vocab_size=32)
    net = make_net(cfg, chunks=chunks, overlap=overlap, interlock=interlock)
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
        assert (id(net.gpt.wte.weight) in reached) == (k == 0 or chunk.embed)  # the embedding: chunk 1's own
        if k and interlock == 1:
            assert chunk.cut == chunk.start - overlap
        if interlock > 1:  # whole chunks: its own and the n-1 before it
            assert chunk.cut == net.plan[max(k - interlock + 1, 0)].start and chunk.embed == (0 < k < interlock)
    # the last block of chunk 1 learns from its own loss and every loss that reaches back to it
    both = [k for k in range(len(net)) if set(net.plan[k].trained) & {net.plan[0].end - 1}]
    assert both == [k for k in range(len(net)) if net.plan[k].cut < net.plan[0].end]
    assert len(both) >= 2


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


# chunks, overlap, interlock: part of and all of the previous chunk, across two chunks, whole chunks
OVERLAPS = [(2, 1, 1), (2, 2, 1), (4, 1, 1), ([2, 3], 2, 1), (4, 0, 2), (4, 0, 4)]


def run_to(net, idx, k):
    """Chunks 0..k-1 forward: the hand-off chunk k starts from."""
    x = idx
    for j in range(k):
        x, _, _ = net.forward_chunk(j, x)
    return x


@pytest.mark.parametrize(("chunks", "overlap", "interlock"), OVERLAPS)
def test_overlap_recomputation_replays_the_dropout_masks_bit_for_bit(chunks, overlap, interlock):
    net = make_net(DROPOUT, chunks=chunks, overlap=overlap, interlock=interlock).train()
    idx, _ = batch(DROPOUT)
    for k in range(1, len(net)):
        handoff = run_to(net, idx, k)
        state = torch.get_rng_state()
        again = net.recompute_overlap(k, handoff)
        assert torch.equal(again, handoff[net.plan[k].start]), f"chunk {k + 1}'s recomputation differs"
        assert torch.equal(torch.get_rng_state(), state), "the replay moved the global random stream"
        handoff.pop("rng")  # without the recorded state, the recomputation draws other masks
        assert not torch.equal(net.recompute_overlap(k, handoff), handoff[net.plan[k].start])


def through_recomputation(net, idx, k):
    """Chunk k's logits as training computes them: its input's gradient goes through the recomputed overlap."""
    _, _, logits = net.forward_chunk(k, run_to(net, idx, k))
    return logits


def through_one_graph(net, idx, k):
    """Chunk k's logits from one plain forward of the model up to chunk k, cut at chunk k's cut (not at all when
    its loss reaches the embedding): every block runs once, drawing the masks in the order training draws
    them, and chunk k's gradient flows through that forward (the heads draw no dropout masks)."""
    chunk = net.plan[k]
    h = net.gpt.embed(idx)
    for i in range(chunk.end):
        if i == chunk.cut and not chunk.embed:
            h = h.detach()
        h = net.gpt.blocks[i](h)
    return net.head(k, h)


@pytest.mark.parametrize(("chunks", "overlap", "interlock"), OVERLAPS)
def test_overlap_gradient_is_the_gradient_through_the_original_forward(chunks, overlap, interlock):
    """Chunk k's loss gives the blocks it overlaps the gradient through the very forward (dropout masks
    included) that produced the value handed on, as one graph without recomputation computes it."""
    net = make_net(DROPOUT, chunks=chunks, overlap=overlap, interlock=interlock).train()
    idx, targets = batch(DROPOUT)
    for k in range(1, len(net)):
        chunk = net.plan[k]
        overlapped = [p for i in range(chunk.cut, chunk.start) for p in net.gpt.blocks[i].parameters()]
        overlapped += list(net.gpt.wte.parameters()) if chunk.embed else []
        grads = []
        for forward in (through_recomputation, through_one_graph):
            torch.manual_seed(7)
            grads.append(torch.autograd.grad(lm_loss(forward(net, idx, k), targets), overlapped))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_interlocking_every_chunk_is_end_to_end_training_on_the_sum_of_the_local_losses():
    """interlock=K: every loss reaches back to the embedding, so the gradients are those of one end-to-end
    backward of the summed local losses (the global phase, with no cut), dropout masks included."""
    idx, targets = batch(DROPOUT)
    interlocked = make_net(DROPOUT, chunks=4, interlock=4)
    sequential_backward(interlocked, idx, chunk_loss(targets), lambda loss: loss.backward(), [1.0] * 4)
    plain = make_net(DROPOUT, chunks=4)
    plain.local = False
    joint_backward(plain, idx, chunk_loss(targets), lambda loss: loss.backward(), [1.0] * 4)
    for (name, a), b in zip(interlocked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_overlap_with_dropout_does_not_change_what_is_handed_on():
    """The replay draws nothing from the global stream: later chunks draw the masks they draw without overlap."""
    outputs = []
    for overlap in (0, 1):
        net = make_net(DROPOUT, chunks=4, overlap=overlap).train()
        torch.manual_seed(3)
        outputs.append(net(batch(DROPOUT)[0]))
    for (h0, l0), (h1, l1) in zip(*outputs):
        torch.testing.assert_close(h0, h1, rtol=0, atol=0)
        torch.testing.assert_close(l0, l1, rtol=0, atol=0)


def test_rotary_attention_scores_depend_on_relative_position_only():
    from locallearn.model.gpt import rotate

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    T = 12
    qs, ks = rotate(q.expand(1, 1, T, 8).contiguous()), rotate(k.expand(1, 1, T, 8).contiguous())
    scores = (qs @ ks.transpose(-1, -2))[0, 0]  # (T, T): the same q and k at every position
    for d in range(-3, 4):  # every diagonal holds one value: the score of an offset
        diag = torch.diagonal(scores, d)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)
    assert torch.allclose(rotate(q.expand(1, 1, 1, 8)), q)  # position 0 is not turned
    assert torch.allclose(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 1, T))  # a rotation keeps the norm


def test_rope_model_has_no_position_embedding_and_chunks_as_usual():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=10, pos="rope")
    net = ChunkedGPT(GPT(cfg), ChunkPlan.build(2, 2), LinearHead)
    assert net.gpt.wpe is None and net.gpt.wte in net.trunk_modules(0)
    idx = torch.randint(10, (2, 8))
    out = net(idx)
    assert [logits.shape for _, logits in out] == [(2, 8, 10)] * 2
    sum(F.cross_entropy(lg.flatten(0, 1), idx.flatten()) for _, lg in out).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"pos": "alibi"}, "model.pos=alibi must be learned or rope"),
    ({"pos": "rope", "n_embd": 6, "n_head": 2}, "head size model.n_embd/model.n_head=3 is odd"),
])
def test_bad_position_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("/", ".")):
        GPTConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 8, **kwargs})
