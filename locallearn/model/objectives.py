"""Objectives turn a batch and a chunk's predictions into that chunk's loss.

They know nothing about chunking: the same objective scores every chunk's head. Each one says
which attention it needs (``causal``), how many token ids it adds to the data's vocabulary (the
mask token), and whether each chunk needs an extra module (the span-boundary network).

``prepare(batch, generator, rank, world)``: windows (B, T+1), or a task's ``(windows, answer)`` pair
(answer: (B, T+1) bool, which tokens are answers) -> :class:`Prepared` model inputs and targets,
random choices drawn from ``generator`` (seeded by step in training, fixed in validation).
With data parallelism the choices are drawn for the combined (world x B, T) batch and rank ``rank``
keeps rows [rank x B, (rank+1) x B), the rows its windows have in that batch (see
:class:`locallearn.data.windows.RandomWindows`): N ranks mask exactly as one process with N x B would.
``loss(logits, h, prepared, module)``: a chunk's logits (B, T, V), hidden states (B, T, C) and
extra module -> mean cross-entropy (nats) over the positions that have targets; a batch without any
target scores a finite 0 that is still in the graph (a zero gradient), never NaN.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from locallearn.errors import ConfigError
from locallearn.model.gpt import GPTConfig, init_weights

IGNORE = -100  # target of positions without a loss


@dataclass
class Prepared:
    idx: torch.Tensor  # (B, T) model input
    targets: torch.Tensor  # (B, T) token to predict, IGNORE where there is no loss
    span_left: torch.Tensor | None = None  # (B, T) position of the token's left span boundary, -1 outside spans
    span_right: torch.Tensor | None = None  # (B, T) position of its right span boundary
    span_offset: torch.Tensor | None = None  # (B, T) offset of the token inside its span
    answer: torch.Tensor | None = None  # (B, T) bool: the target is a task's answer (tasks only)


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch -> (windows (B, T+1), answer mask (B, T+1) or None): tasks' validation batches carry the mask."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch, None


def answer_scores(logits, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, T, V) logits -> summed cross-entropy (nats) and number of correct argmax predictions over the
    answers that are targets, and their count."""
    where = prepared.answer & (prepared.targets != IGNORE)
    logits, targets = logits[where], prepared.targets[where]  # (N, V), (N,)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, (logits.argmax(-1) == targets).sum(), int(where.sum())


def _cross_entropy(logits, targets):
    """(..., V) logits, (...) targets -> mean over the targets that are not IGNORE, or 0 without any."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if not bool((targets != IGNORE).any()):
        # The mean would be 0/0 = NaN (read as divergence); the sum over nothing is 0, with a zero gradient.
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)


def span_length_pmf(p: float, max_span: int) -> list[float]:
    """SpanBERT's span-length law, Geometric(p) on 1..max_span truncated and renormalised:
    P(l) = p (1-p)^(l-1) / (1 - (1-p)^max_span), listed for l = 1..max_span."""
    mass = 1 - (1 - p) ** max_span  # P(L <= max_span) of the untruncated geometric
    return [p * (1 - p) ** (length - 1) / mass for length in range(1, max_span + 1)]


def span_lengths(u: torch.Tensor, p: float, max_span: int) -> torch.Tensor:
    """Uniform draws u in [0, 1) -> span lengths (same shape) from :func:`span_length_pmf`, by inverse CDF.

    The truncated CDF is F(l) = (1 - (1-p)^l) / mass, so l = the least integer with (1-p)^l < 1 - u mass.
    Scaling u by the mass renormalises the tail rather than piling it on max_span, as clipping would.
    """
    if p == 1:
        return torch.ones(u.shape, dtype=torch.long)
    mass = 1 - (1 - p) ** max_span
    length = torch.floor(torch.log1p(-u.double() * mass) / math.log1p(-p)).long() + 1
    return length.clamp(1, max_span)  # rounding at the very top of the range can step one past max_span


class CausalLM:
    """Next-token prediction with causal attention."""

    name = "clm"
    extra_tokens = 0
    min_block_size = 1  # the shortest window the objective can score
    loss_terms = 1  # cross-entropies the loss sums: its no-context baseline is this x the unigram entropy
    position_wise = True  # the loss sums over positions, so it can be scored in slices of the sequence (loss_slices)

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

    def prepare(self, batch, generator=None, rank: int = 0, world: int = 1) -> Prepared:
        batch, answer = split_batch(batch)
        return Prepared(batch[:, :-1], batch[:, 1:], answer=answer[:, 1:] if answer is not None else None)

    def loss(self, logits, h, prepared: Prepared, module=None):
        return _cross_entropy(logits, prepared.targets)

    def loss_part(self, logits, prepared: Prepared, part: slice):
        """The share of :meth:`loss` that positions ``part`` of the sequence score, from their (B, t, V) logits:
        their summed cross-entropy over the whole batch's number of targets, so that the parts add up to it."""
        targets = prepared.targets[:, part]
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")
        return total / max(int((prepared.targets != IGNORE).sum()), 1)

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

    def _corrupt(self, x, select, unit_of, generator, rows):
        """80/10/10 per selection unit (a token for mlm, a span for span masking), decided for the whole
        combined batch: select, unit_of (world*B, T); x (B, T) = this rank's ``rows`` -> its input (B, T)."""
        n_units = int(unit_of.max()) + 1 if unit_of.numel() else 0
        u = torch.rand(n_units + 1, generator=generator)[unit_of.clamp(min=0)]  # same draw for a whole unit
        random_tokens = torch.randint(self.vocab_size, unit_of.shape, generator=generator)
        select, u, random_tokens = select[rows], u[rows], random_tokens[rows]
        idx = torch.where(select & (u < 0.8), torch.full_like(x, self.mask_id), x)
        return torch.where(select & (u >= 0.8) & (u < 0.9), random_tokens, idx)

    def prepare(self, batch, generator=None, rank: int = 0, world: int = 1) -> Prepared:
        batch, answer = split_batch(batch)
        x = batch[:, :-1].cpu()  # (B, T): the same T positions as clm; random choices on the CPU generator
        B, T = x.shape
        rows = slice(rank * B, (rank + 1) * B)  # this rank's rows of the combined (world*B, T) batch
        select = torch.rand(world * B, T, generator=generator) < self.mask_prob
        unit_of = torch.arange(world * B * T).view(world * B, T)
        idx = self._corrupt(x, select, unit_of, generator, rows)
        targets = torch.where(select[rows], x, torch.full_like(x, IGNORE))
        # Position t's target is token t itself (not t+1 as in clm): its answer flag too.
        return Prepared(idx.to(batch.device), targets.to(batch.device),
                        answer=answer[:, :-1] if answer is not None else None)


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
    """SpanBERT (Joshi et al. 2020): contiguous spans with lengths ~ Geometric(p) truncated at ``max_span``
    and renormalised (:func:`span_length_pmf`; mean 3.80 for p=0.2, max 10), covering ``mask_prob`` of
    the tokens in expectation, 80/10/10 per span; loss = masked LM + span-boundary objective (SBO).

    Where it departs from the paper: spans are of tokens, not whole words (the paper measures length in
    words and masks complete words); spans never touch and stay inside positions 1..T-2, so both
    boundary tokens of every span exist and are unmasked, which the SBO needs; and the number of spans
    per window is drawn so that coverage is ``mask_prob`` in expectation, where the paper samples spans
    until each sequence's 15% budget is spent.
    """

    name = "span"
    loss_terms = 2  # MLM + SBO
    position_wise = False  # the SBO scores a span's tokens from its boundaries, wherever a slice would cut it
    min_block_size = 3  # a span and an unmasked boundary token on each side

    def __init__(self, causal: bool = False, mask_prob: float = 0.15, geometric_p: float = 0.2, max_span: int = 10):
        super().__init__(causal, mask_prob)
        if not 0.0 < geometric_p <= 1.0:
            raise ConfigError(f"objective.geometric_p={geometric_p} must lie in (0, 1].")
        if max_span < 1:
            raise ConfigError(f"objective.max_span={max_span} must be at least 1.")
        self.p, self.max_span = geometric_p, max_span
        self._mean_span = sum(length * q for length, q in enumerate(span_length_pmf(geometric_p, max_span), 1))

    @property
    def mean_span(self) -> float:
        """Mean span length under the truncated law; it sets how many spans make ``mask_prob`` coverage."""
        return self._mean_span

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
            length = int(span_lengths(torch.rand(1, generator=generator), self.p, self.max_span))
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

    def prepare(self, batch, generator=None, rank: int = 0, world: int = 1) -> Prepared:
        batch, answer = split_batch(batch)
        x = batch[:, :-1].cpu()  # (B, T)
        B, T = x.shape
        # Spans are placed for the whole combined (world*B, T) batch; this rank keeps its own rows.
        left = torch.full((world * B, T), -1, dtype=torch.long)
        right, offset = left.clone(), torch.zeros(world * B, T, dtype=torch.long)
        unit_of = left.clone()
        n_units = 0
        for b in range(world * B):
            for s, e in self._spans(T, generator):
                left[b, s:e + 1], right[b, s:e + 1] = s - 1, e + 1
                offset[b, s:e + 1] = torch.arange(e - s + 1)
                unit_of[b, s:e + 1] = n_units
                n_units += 1
        rows = slice(rank * B, (rank + 1) * B)
        idx = self._corrupt(x, left >= 0, unit_of, generator, rows)
        left, right, offset = left[rows], right[rows], offset[rows]
        targets = torch.where(left >= 0, x, torch.full_like(x, IGNORE))
        dev = batch.device
        return Prepared(idx.to(dev), targets.to(dev), left.to(dev), right.to(dev), offset.to(dev),
                        answer[:, :-1] if answer is not None else None)

    def loss(self, logits, h, prepared: Prepared, module=None):
        mlm = _cross_entropy(logits, prepared.targets)
        # Scored even without spans (0 rows): the boundary network then gets a zero gradient rather than
        # none, so every data-parallel rank has the same gradients to average whatever its spans.
        sbo_logits, (b, t) = module(h, prepared)
        return mlm + _cross_entropy(sbo_logits, prepared.targets[b, t])
