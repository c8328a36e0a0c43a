"""Objectives turn a batch and a chunk's predictions into that chunk's loss.

They know nothing about chunking: the same objective scores every chunk's head. Each one says
which attention it needs (``causal``), how many token ids it adds to the data's vocabulary (the
mask token), and whether each chunk needs an extra module (the span-boundary network).

``prepare(batch, generator)``: windows (B, T+1) -> :class:`Prepared` model inputs and targets,
random choices drawn from ``generator`` (seeded by step in training, fixed in validation).
``loss(logits, h, prepared, module)``: a chunk's logits (B, T, V), hidden states (B, T, C) and
extra module -> mean cross-entropy (nats) over the positions that have targets.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from locallearn.errors import ConfigError
from locallearn.model import GPTConfig, init_weights

IGNORE = -100  # target of positions without a loss


@dataclass
class Prepared:
    idx: torch.Tensor  # (B, T) model input
    targets: torch.Tensor  # (B, T) token to predict, IGNORE where there is no loss
    span_left: torch.Tensor | None = None  # (B, T) position of the token's left span boundary, -1 outside spans
    span_right: torch.Tensor | None = None  # (B, T) position of its right span boundary
    span_offset: torch.Tensor | None = None  # (B, T) offset of the token inside its span


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


class CausalLM:
    """Next-token prediction with causal attention."""

    name = "clm"
    extra_tokens = 0
    loss_terms = 1  # cross-entropies the loss sums: its no-context baseline is this x the unigram entropy

    def __init__(self, causal: bool = True):
        if not causal:
            raise ConfigError("objective=clm with causal=false would let every position see its target; "
                              "keep causal attention (objective.causal=true) or use objective=mlm.")
        self.causal = True

    def bind(self, vocab_size: int):
        """Learn the data's vocabulary size (for mask and random tokens)."""
        self.vocab_size = vocab_size

    def chunk_module(self, cfg: GPTConfig) -> nn.Module | None:
        return None

    def prepare(self, batch, generator=None) -> Prepared:
        return Prepared(batch[:, :-1], batch[:, 1:])

    def loss(self, logits, h, prepared: Prepared, module=None):
        return _cross_entropy(logits, prepared.targets)

    def __repr__(self):
        return f"{type(self).__name__}()"


class MaskedLM(CausalLM):
    """BERT-style masked LM with bidirectional attention: ``mask_prob`` of the positions are selected;
    of those 80% become the mask token, 10% a random token, 10% stay; the loss is on selected positions."""

    name = "mlm"
    extra_tokens = 1  # the mask token, id = the data's vocab_size

    def __init__(self, causal: bool = False, mask_prob: float = 0.15):
        if causal:
            raise ConfigError(f"objective={self.name} needs bidirectional attention but objective.causal=true; "
                              f"drop that override (model.causal follows the objective).")
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"objective.mask_prob={mask_prob} must lie strictly between 0 and 1.")
        self.causal, self.mask_prob = False, mask_prob

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def _corrupt(self, x, select_unit, unit_of, generator):
        """80/10/10 per selection unit (a token for mlm, a span for span masking)."""
        n_units = int(unit_of.max()) + 1 if unit_of.numel() else 0
        u = torch.rand(n_units + 1, generator=generator)[unit_of.clamp(min=0)]  # same draw for a whole unit
        random_tokens = torch.randint(self.vocab_size, x.shape, generator=generator)
        idx = torch.where(select_unit & (u < 0.8), torch.full_like(x, self.mask_id), x)
        return torch.where(select_unit & (u >= 0.8) & (u < 0.9), random_tokens, idx)

    def prepare(self, batch, generator=None) -> Prepared:
        x = batch[:, :-1].cpu()  # the same T positions as clm; random choices on the CPU generator
        select = torch.rand(x.shape, generator=generator) < self.mask_prob
        unit_of = torch.arange(x.numel()).view(x.shape)
        idx = self._corrupt(x, select, unit_of, generator)
        targets = torch.where(select, x, torch.full_like(x, IGNORE))
        return Prepared(idx.to(batch.device), targets.to(batch.device))


class SpanBoundaryHead(nn.Module):
    """Span-boundary objective network (SpanBERT): [h(left boundary), h(right boundary), p(offset)] ->
    logits over the vocabulary for each token inside a span. Input (N, 3C) -> (N, vocab_size)."""

    def __init__(self, cfg: GPTConfig, max_span: int):
        super().__init__()
        C = cfg.n_embd
        self.offset = nn.Embedding(max_span, C)
        self.net = nn.Sequential(nn.Linear(3 * C, C), nn.GELU(), nn.LayerNorm(C),
                                 nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C))
        self.proj = nn.Linear(C, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def inputs(self, h, prepared: Prepared):
        """(B, T, C) hidden states -> (N, 3C) inputs for the N tokens inside spans."""
        b, t = (prepared.span_left >= 0).nonzero(as_tuple=True)
        left, right = prepared.span_left[b, t], prepared.span_right[b, t]
        return torch.cat([h[b, left], h[b, right], self.offset(prepared.span_offset[b, t])], dim=-1), (b, t)

    def forward(self, h, prepared: Prepared):
        x, where = self.inputs(h, prepared)
        return self.proj(self.net(x)), where


class SpanMasking(MaskedLM):
    """SpanBERT: contiguous spans, lengths ~ Geometric(p) clipped at ``max_span``, covering ``mask_prob``
    of the tokens (in expectation), 80/10/10 per span; loss = masked LM + span-boundary objective."""

    name = "span"
    loss_terms = 2  # MLM + SBO

    def __init__(self, causal: bool = False, mask_prob: float = 0.15, geometric_p: float = 0.2, max_span: int = 10):
        super().__init__(causal, mask_prob)
        if not 0.0 < geometric_p <= 1.0:
            raise ConfigError(f"objective.geometric_p={geometric_p} must lie in (0, 1].")
        if max_span < 1:
            raise ConfigError(f"objective.max_span={max_span} must be at least 1.")
        self.p, self.max_span = geometric_p, max_span

    @property
    def mean_span(self) -> float:
        """E[min(L, max_span)] for L ~ Geometric(p) on 1, 2, ...: sum of P(L > k) for k < max_span."""
        return sum((1 - self.p) ** k for k in range(self.max_span))

    def chunk_module(self, cfg: GPTConfig) -> nn.Module:
        return SpanBoundaryHead(cfg, self.max_span)

    def _spans(self, T: int, generator) -> list[tuple[int, int]]:
        """Non-overlapping spans (start, end inclusive) inside 1..T-2, so both boundaries exist, with an
        unmasked token between spans; the span count is rounded at random so coverage is mask_prob on average."""
        expected = self.mask_prob * T / self.mean_span
        n = int(expected) + int(torch.rand(1, generator=generator) < expected - int(expected))
        taken = torch.zeros(T, dtype=torch.bool)
        spans = []
        for _ in range(n):
            # Inverse CDF of Geometric(p) on 1, 2, ...: P(L = k) = (1-p)^(k-1) p; then clip at max_span.
            u = float(torch.rand(1, generator=generator).clamp(min=1e-12))
            length = 1 if self.p == 1 else min(int(math.log(u) / math.log(1 - self.p)) + 1, self.max_span)
            hi = T - 1 - length  # last start that leaves a right boundary inside the window
            for _attempt in range(20):  # place it where it touches no other span (boundaries stay visible)
                if hi < 1:
                    break
                s = int(torch.randint(1, hi + 1, (1,), generator=generator))
                e = s + length - 1
                if not taken[s - 1:e + 2].any():
                    taken[s:e + 1] = True
                    spans.append((s, e))
                    break
        return spans

    def prepare(self, batch, generator=None) -> Prepared:
        x = batch[:, :-1].cpu()
        B, T = x.shape
        left = torch.full((B, T), -1, dtype=torch.long)
        right, offset = left.clone(), torch.zeros(B, T, dtype=torch.long)
        unit_of = torch.full((B, T), -1, dtype=torch.long)
        n_units = 0
        for b in range(B):
            for s, e in self._spans(T, generator):
                left[b, s:e + 1], right[b, s:e + 1] = s - 1, e + 1
                offset[b, s:e + 1] = torch.arange(e - s + 1)
                unit_of[b, s:e + 1] = n_units
                n_units += 1
        select = left >= 0
        idx = self._corrupt(x, select, unit_of, generator)
        targets = torch.where(select, x, torch.full_like(x, IGNORE))
        dev = batch.device
        return Prepared(idx.to(dev), targets.to(dev), left.to(dev), right.to(dev), offset.to(dev))

    def loss(self, logits, h, prepared: Prepared, module=None):
        mlm = _cross_entropy(logits, prepared.targets)
        sbo_logits, (b, t) = module(h, prepared)
        if sbo_logits.shape[0] == 0:  # no span in this batch: nothing for the boundary objective
            return mlm
        return mlm + F.cross_entropy(sbo_logits, prepared.targets[b, t])
