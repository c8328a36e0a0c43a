"""Synthetic-gradient modules (Jaderberg et al. 2017, "Decoupled Neural Interfaces using Synthetic Gradients").

One sits at every chunk boundary but the last chunk's, owned by the chunk below it: it reads that chunk's output
and predicts the gradient the next chunk's objective will send back to it (see
:class:`locallearn.training.methods.SyntheticGradients`, which trains it and uses it).
"""

from dataclasses import replace

import torch.nn as nn

from locallearn.model.gpt import Block, GPTConfig, init_weights


class GradientPredictor(nn.Module):
    """(B, T, C) a chunk's output -> (B, T, C) the predicted gradient of the next chunk's objective w.r.t. it, per
    token: in units of the gradient times B*T, so that targets are O(1) whatever the batch (a loss that is a mean over
    B*T tokens has per-element gradients of order 1/(B*T), far below Adam's epsilon).

    With ``attention``, first a transformer block that attends both ways: a token's gradient comes from the losses
    at its own and *later* positions (through the next chunk's attention), which a per-token map cannot see. The
    predictor only shapes training signals, so it may look ahead without leaking anything into the model's outputs.
    Then LayerNorm and an MLP with ``hidden`` units (0: one linear map, Czarnecki et al. 2017's choice). The output
    layer starts at zero, as in the paper, so training starts as plain local learning.
    """

    def __init__(self, cfg: GPTConfig, hidden: int = 128, attention: bool = False):
        super().__init__()
        C = cfg.n_embd
        self.block = Block(replace(cfg, causal=False, dropout=0.0)) if attention else nn.Identity()
        layers = [nn.Linear(C, hidden), nn.GELU(), nn.Linear(hidden, C)] if hidden else [nn.Linear(C, C)]
        self.net = nn.Sequential(nn.LayerNorm(C, bias=cfg.bias), *layers)
        self.apply(init_weights)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h):
        return self.net(self.block(h))  # (B, T, C)
