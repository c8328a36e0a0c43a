"""Auxiliary heads: turn a chunk's hidden states into predictions for its local loss.

Every chunk but the last gets one, built by a Hydra ``_partial_`` from ``conf/head/`` and called
with the model's :class:`GPTConfig`; the last chunk's head is the model's own final norm + LM head.
Heads differ in capacity: how much work a chunk can leave to its head instead of its blocks.
"""

import torch.nn as nn

from locallearn.model.gpt import MLP, Block, GPTConfig, init_weights


class LinearHead(nn.Module):
    """(B, T, C) hidden states -> (B, T, vocab_size) logits: LayerNorm + Linear unembedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, h):
        return self.proj(self.ln(h))


class MLPHead(nn.Module):
    """(B, T, C) -> (B, T, vocab_size): LayerNorm + two-layer GELU MLP + unembedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.proj = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, h):
        return self.proj(self.mlp(self.ln(h)))


class BlockHead(nn.Module):
    """(B, T, C) -> (B, T, vocab_size): one transformer block + LayerNorm + unembedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.block = Block(cfg)
        self.out = LinearHead(cfg)
        self.apply(init_weights)

    def forward(self, h):
        return self.out(self.block(h))
