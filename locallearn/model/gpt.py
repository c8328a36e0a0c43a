"""A GPT-style decoder as a plain ``nn.Module``.

The model knows nothing about chunks: it exposes its pieces (``embed``, ``blocks``, ``ln_f``,
``lm_head``) so that :mod:`locallearn.model.chunked` can run them chunk by chunk. ``forward`` is the
ordinary end-to-end pass. Input and output embeddings are *not* tied: tying would make the
embedding (chunk 1) and the LM head (last chunk) one tensor trained by two local losses.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from locallearn.errors import ConfigError


@dataclass
class GPTConfig:
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual stream width
    block_size: int = 64  # longest context the position embedding covers
    vocab_size: int = 256  # number of token ids (set from the data at run time)
    dropout: float = 0.0  # dropout on embeddings, attention and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorms
    causal: bool = True  # causal attention (clm); False for bidirectional objectives (mlm, span)
    pos: str = "learned"  # position information: learned absolute embeddings (GPT-2) | rope (rotary, in attention)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose a width that is a multiple of the number of heads."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must lie in [0, 1).")
        if self.pos not in ("learned", "rope"):
            raise ConfigError(f"model.pos={self.pos} must be learned or rope.")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"model.pos=rope rotates pairs of channels, but the head size "
                              f"model.n_embd/model.n_head={self.n_embd // self.n_head} is odd; make it even.")


def rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of (B, nh, T, hs) queries or keys: channel pair i of
    position t turned by the angle t / base^(2i/hs), so that q_t . k_s depends on t - s only."""
    T, hs = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    angle = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freq  # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """(B, T, C) -> (B, T, C): multi-head self-attention, causal unless ``cfg.causal`` is False."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.causal, self.rope = cfg.n_head, cfg.causal, cfg.pos == "rope"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            q, k = rotate(q), rotate(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C): two-layer GELU feed-forward network, 4x wide."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """(B, T, C) -> (B, T, C): pre-LN transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size): next-token with causal attention, else per-position."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        # GPT-2: scale the residual projections so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def embed(self, idx):
        """(B, T) token ids -> (B, T, C) token + position embeddings."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        return self.drop(x)

    def head(self, h):
        """(B, T, C) -> (B, T, vocab_size): final norm and LM head."""
        return self.lm_head(self.ln_f(h))

    def forward(self, idx):
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def init_weights(module: nn.Module):
    """GPT-2 initialisation, shared by the model and the auxiliary heads."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
