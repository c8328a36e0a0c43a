"""A model cut into chunks: the GPT, its chunk plan and one head per chunk.

``forward_chunk`` holds the package's single gradient cut: every chunk but the first starts from
a detached copy of its input, so the chunk's local loss can only reach that chunk's parameters and
its head. With one chunk there is nothing to cut and the pass is ordinary end-to-end backprop.
"""

from collections.abc import Callable

import torch.nn as nn

from locallearn.chunking import ChunkPlan
from locallearn.model import GPT


class ChunkedGPT(nn.Module):
    """A GPT split by a :class:`ChunkPlan`.

    ``forward_chunk(k, x)``: chunk k's input (token ids (B, T) for k = 0, else the previous
    chunk's output (B, T, C)) -> (its output (B, T, C), its head's logits (B, T, V)).
    """

    def __init__(self, gpt: GPT, plan: ChunkPlan, make_head: Callable[..., nn.Module]):
        super().__init__()
        cfg = gpt.config
        if plan.n_layer != cfg.n_layer:
            raise ValueError(f"the chunk plan covers {plan.n_layer} blocks but the model has {cfg.n_layer}")
        self.gpt = gpt
        self.plan = plan
        self.aux_heads = nn.ModuleList(
            make_head(n_embd=cfg.n_embd, vocab_size=cfg.vocab_size, bias=cfg.bias) for _ in plan.chunks[:-1]
        )

    def __len__(self) -> int:
        return len(self.plan)

    def forward_chunk(self, k: int, x):
        if k == 0:
            h = self.gpt.embed(x)  # (B, T, C)
        else:
            h = x.detach()  # the gradient cut: no gradient crosses a chunk boundary
        for i in self.plan[k].layers:
            h = self.gpt.blocks[i](h)
        return h, self.head(k, h)

    def head(self, k: int, h):
        """(B, T, C) -> (B, T, V) through chunk k's head."""
        return self.gpt.head(h) if k == len(self.plan) - 1 else self.aux_heads[k](h)

    def forward(self, idx):
        """(B, T) token ids -> list of every chunk's logits (B, T, V), first chunk first."""
        out, h = [], idx
        for k in range(len(self.plan)):
            h, logits = self.forward_chunk(k, h)
            out.append(logits)
        return out

    def trunk_modules(self, k: int) -> list[nn.Module]:
        """The model pieces chunk k trains (its blocks, and the embedding for chunk 1)."""
        mods = [self.gpt.blocks[i] for i in self.plan[k].layers]
        return ([self.gpt.wte, self.gpt.wpe] if k == 0 else []) + mods

    def head_modules(self, k: int) -> list[nn.Module]:
        return [self.gpt.ln_f, self.gpt.lm_head] if k == len(self.plan) - 1 else [self.aux_heads[k]]

    def chunk_parameters(self, k: int) -> list[nn.Parameter]:
        """Every parameter chunk k's local loss trains: its trunk and its head."""
        return [p for m in self.trunk_modules(k) + self.head_modules(k) for p in m.parameters()]

    def parameter_counts(self) -> list[dict[str, int]]:
        """Per chunk: number of trunk and head parameters."""
        count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        return [{"trunk": count(self.trunk_modules(k)), "head": count(self.head_modules(k))} for k in range(len(self))]
