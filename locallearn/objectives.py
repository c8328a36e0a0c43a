"""Objectives turn a batch and a chunk's predictions into that chunk's loss.

They know nothing about chunking: the same objective scores every chunk's head.
"""

import torch.nn.functional as F


class CausalLM:
    """Next-token prediction.

    ``prepare``: a batch of windows (B, T+1) -> inputs (B, T) and targets (B, T).
    ``loss``: logits (B, T, V) and targets (B, T) -> mean cross-entropy in nats.
    """

    causal = True  # the model's attention must be causal for this objective

    def prepare(self, batch):
        return batch[:, :-1], batch[:, 1:]

    def loss(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def __repr__(self):
        return "CausalLM()"
