"""Auxiliary heads: turn a chunk's hidden states into predictions for its local loss.

Every chunk but the last gets one (built by a Hydra ``_partial_`` from ``conf/head/``); the last
chunk's head is the model's own final norm + LM head.
"""

import torch.nn as nn

from locallearn.model import init_weights


class LinearHead(nn.Module):
    """(B, T, C) hidden states -> (B, T, vocab_size) logits: LayerNorm + Linear unembedding."""

    def __init__(self, n_embd: int, vocab_size: int, bias: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, h):
        return self.proj(self.ln(h))
