"""A model cut into chunks: the GPT, its chunk plan and one head per chunk.

``forward_chunk`` holds the package's single gradient cut: every chunk but the first starts from
a detached copy of its input, so the chunk's local loss can only reach that chunk's parameters and
its head. With one chunk there is nothing to cut and the pass is ordinary end-to-end backprop.
With ``overlap`` or ``interlock`` the cut moves down into earlier chunks (below the embedding for an
interlock that reaches chunk 1), and with ``local = False`` (the global phase after a local-to-global
switch) there is no cut at all.

An overlapping chunk recomputes the earlier blocks its loss reaches from the cut. With dropout, the
recomputation replays, for each earlier chunk's stretch of them, the random state that chunk's forward
drew its masks from, so the gradient goes through the very sample that produced the value handed on (as
activation checkpointing's ``preserve_rng_state`` does), and the replay leaves the global random stream
as it was.
"""

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from locallearn.config import instantiate
from locallearn.model.gpt import GPT
from locallearn.model.plan import ChunkPlan


class ChunkedGPT(nn.Module):
    """A GPT split by a :class:`ChunkPlan`.

    ``forward_chunk(k, x)``: chunk k's input (token ids (B, T) for k = 0, else the hand-off dict
    returned by chunk k-1: hidden states by block index and, under ``"rng"``, the random state to replay)
    -> (hand-off for chunk k+1, its output h (B, T, C), its head's logits (B, T, V)).
    ``make_head(cfg)`` builds the auxiliary heads; ``make_extra(cfg)`` (optional) builds one more
    module per chunk that the objective needs (the span-boundary network); ``make_predictor(cfg)`` (optional) one
    per chunk but the last, that a method trains at the chunk's output (synthetic gradients).
    """

    def __init__(self, gpt: GPT, plan: ChunkPlan, make_head: Callable[..., nn.Module],
                 make_extra: Callable[..., nn.Module | None] | None = None,
                 make_predictor: Callable[..., nn.Module] | None = None):
        super().__init__()
        cfg = gpt.config
        if plan.n_layer != cfg.n_layer:
            raise ValueError(f"the chunk plan covers {plan.n_layer} blocks but the model has {cfg.n_layer}")
        self.gpt = gpt
        self.plan = plan
        self.aux_heads = nn.ModuleList(make_head(cfg) for _ in plan.chunks[:-1])
        extras = [make_extra(cfg) for _ in plan.chunks] if make_extra else []
        self.extra = nn.ModuleList(extras) if extras and all(m is not None for m in extras) else None
        self.predictors = nn.ModuleList(make_predictor(cfg) for _ in plan.chunks[:-1]) if make_predictor else None
        self.local = True  # False in the global phase: gradients cross chunk boundaries
        self.loss_slices = 1  # a chunk's own backward scores its head in this many slices of the sequence

    def __len__(self) -> int:
        return len(self.plan)

    def _input(self, k: int, handoff: dict, grad_input: bool = False):
        chunk = self.plan[k]
        own = handoff[chunk.start]  # the previous chunk's output
        if not self.local:
            return own
        if chunk.cut == chunk.start:
            # The gradient cut: no gradient crosses it. With grad_input the cut input is a leaf that collects the
            # gradient of this chunk's objective, for a method to send back (it never reaches the chunk below).
            return handoff[chunk.cut].detach().requires_grad_(grad_input)
        h = self.recompute_overlap(k, handoff)
        # The value handed on is the previous chunk's own output (bit for bit what the recomputation gives,
        # but not left to it); the gradient goes through the recomputation.
        return own.detach() + (h - h.detach())

    def recompute_overlap(self, k: int, handoff: dict):
        """(B, T, C): the earlier blocks chunk k's loss reaches (and the embedding, for an interlock into chunk 1),
        run again from the detached cut, each chunk's stretch of them under the random state their first run
        drew dropout masks from (recorded in ``handoff["rng"]``), so with the same masks."""
        chunk, rng = self.plan[k], handoff.get("rng", {})
        device = handoff[chunk.start].device
        replay = lambda key: replaying(rng[key], device) if key in rng else nullcontext()  # noqa: E731
        if chunk.embed:
            with replay("embed"):
                h = self.gpt.embed(handoff["idx"])
        else:
            h = handoff[chunk.cut].detach()  # the gradient cut: no gradient crosses it
        for a, b in self._stretches(chunk):
            with replay(a):
                for i in range(a, b):
                    h = self.gpt.blocks[i](h)
        return h

    def _stretches(self, chunk) -> list[tuple[int, int]]:
        """The blocks ``chunk`` overlaps, as (first, one past last) per chunk that owns them."""
        edges = sorted({chunk.cut, chunk.start} | {c.start for c in self.plan if chunk.cut < c.start < chunk.start})
        return list(zip(edges[:-1], edges[1:]))

    def forward_chunk(self, k: int, x, grad_input: bool = False, head: bool = True):
        """Chunk k on its input (see the class). ``grad_input``: chunk k's cut input is a leaf requiring grad, returned
        in the hand-off under ``"input"``; ``head=False``: no logits (None), for a replay that needs only h."""
        chunk, later = self.plan[k], self.plan.chunks[k + 1:]
        prev = x if k else {"idx": x}
        reach = [c for c in later if c.cut < c.start]  # later chunks whose losses come back through this one
        # Only a training forward with dropout draws masks, and only a local step recomputes the overlap: the
        # random state is recorded where a later chunk's recomputation starts a stretch.
        replay = bool(reach) and self.training and self.local and self.gpt.config.dropout > 0
        rng_at = {key for c in reach for key in [a for a, _ in self._stretches(c)] + ["embed"] * c.embed}
        rng = {key: s for key, s in prev.get("rng", {}).items() if key in rng_at} if replay else {}
        if k == 0:
            if replay and "embed" in rng_at:
                rng["embed"] = dropout_state(x.device)
            h = self.gpt.embed(x)  # (B, T, C)
        else:
            h = self._input(k, x, grad_input)  # (B, T, C)
        cut_input = h
        need = {c.cut for c in later if not c.embed} | {c.start for c in later}  # block inputs later chunks read
        handoff = {i: v for i, v in prev.items() if isinstance(i, int) and i in need}  # from earlier chunks
        if any(c.embed for c in later):
            handoff["idx"] = prev["idx"]
        if chunk.start in need:  # an overlap that spans this whole chunk
            handoff[chunk.start] = h
        for i in chunk.layers:
            if i in rng_at and replay:
                rng[i] = dropout_state(h.device)  # what a later chunk's recomputation replays
            h = self.gpt.blocks[i](h)
            if i + 1 in need:
                handoff[i + 1] = h
        if rng:
            handoff["rng"] = rng
        if grad_input and k:
            handoff["input"] = cut_input
        return handoff, h, self.head(k, h) if head else None

    def head(self, k: int, h):
        """(B, T, C) -> (B, T, V) through chunk k's head."""
        return self.gpt.head(h) if k == len(self.plan) - 1 else self.aux_heads[k](h)

    def forward(self, idx):
        """(B, T) token ids -> [(h, logits) of every chunk], first chunk first."""
        out, x = [], idx
        for k in range(len(self.plan)):
            x, h, logits = self.forward_chunk(k, x)
            out.append((h, logits))
        return out

    def trunk_modules(self, k: int) -> list[nn.Module]:
        """The model pieces chunk k owns (its blocks, and the embedding for chunk 1)."""
        mods = [self.gpt.blocks[i] for i in self.plan[k].layers]
        embeddings = [m for m in (self.gpt.wte, self.gpt.wpe) if m is not None]  # model.pos=rope has no wpe
        return (embeddings if k == 0 else []) + mods

    def head_modules(self, k: int) -> list[nn.Module]:
        """Chunk k's head, its objective module and its gradient predictor, where there are ones."""
        last = k == len(self.plan) - 1
        head = [self.gpt.ln_f, self.gpt.lm_head] if last else [self.aux_heads[k]]
        predictor = [self.predictors[k]] if self.predictors is not None and not last else []
        return head + ([self.extra[k]] if self.extra is not None else []) + predictor

    def chunk_parameters(self, k: int) -> list[nn.Parameter]:
        """The parameters chunk k owns: its trunk and its head (its optimizer param group)."""
        return [p for m in self.trunk_modules(k) + self.head_modules(k) for p in m.parameters()]

    def trained_parameters(self, k: int) -> list[nn.Parameter]:
        """Every parameter chunk k's local loss reaches: its own and those of the blocks it overlaps."""
        chunk = self.plan[k]
        overlapped = [p for i in range(chunk.cut, chunk.start) for p in self.gpt.blocks[i].parameters()]
        embedding = [p for m in self.trunk_modules(0)[:-len(self.plan[0].layers)] for p in m.parameters()]
        return (embedding if chunk.embed else []) + overlapped + self.chunk_parameters(k)

    def parameter_counts(self) -> list[dict[str, int]]:
        """Per chunk: number of trunk and head parameters."""
        count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        return [{"trunk": count(self.trunk_modules(k)), "head": count(self.head_modules(k))} for k in range(len(self))]

    @torch.no_grad()
    def flops_per_token(self, T: int) -> list[dict[str, float]]:
        """Per chunk: forward FLOPs per token of its trunk (overlap recomputation included) and of its
        head, counted by torch's FlopCounterMode on one sequence of length T."""
        was_training = self.training
        self.eval()
        x = torch.zeros(1, T, dtype=torch.long, device=self.gpt.wte.weight.device)
        out = []
        for k in range(len(self.plan)):
            with FlopCounterMode(display=False) as whole:
                nxt, h, _ = self.forward_chunk(k, x)
            with FlopCounterMode(display=False) as head:
                self.head(k, h)
            out.append({"trunk": (whole.get_total_flops() - head.get_total_flops()) / T,
                        "head": head.get_total_flops() / T})
            x = nxt
        self.train(was_training)
        return out


def dropout_state(device: torch.device) -> tuple:
    """The random state dropout draws from on ``device``: the CPU generator's, and the GPU's when on one."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def replaying(state: tuple, device: torch.device):
    """Run under a recorded random state; the global random stream continues afterwards as if nothing ran."""
    cpu, gpu = state
    with torch.random.fork_rng(devices=[device] if gpu is not None else []):
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)
        yield


def make_net(cfg: DictConfig, objective, vocab_size: int) -> ChunkedGPT:
    """The chunked model ``cfg`` describes, for data of ``vocab_size`` tokens (``objective`` is bound to it), with the
    modules its method adds at the boundaries (``method.predictor``)."""
    objective.bind(vocab_size)
    model_cfg = instantiate(cfg.model, vocab_size=vocab_size + objective.extra_tokens)
    plan = ChunkPlan.build(model_cfg.n_layer, cfg.chunks, cfg.get("boundaries"), cfg.get("overlap", 0),
                           cfg.get("interlock", 1))
    predictor = (cfg.get("method") or {}).get("predictor")
    net = ChunkedGPT(GPT(model_cfg), plan, instantiate(cfg.head), objective.chunk_module,
                     instantiate(predictor) if predictor is not None and plan.chunks[1:] else None)
    net.loss_slices = int(cfg.get("loss_slices") or 1)
    if cfg.get("compile"):  # the blocks only: the cut, the heads and the losses stay eager, in every mode
        for block in net.gpt.blocks:
            block.compile()
    return net
