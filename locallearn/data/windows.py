"""Batches of random token windows, reproducible by step.

Training batch ``n`` is drawn from a generator seeded with ``(seed, n)``, so a run resumed at
step ``s`` sees exactly the batches the uninterrupted run would have seen, with no sampler state
to checkpoint. Validation uses one fixed set of windows.
"""

import torch
from torch.utils.data import IterableDataset


def _window_starts(n_tokens: int, width: int, count: int, generator: torch.Generator):
    return torch.randint(n_tokens - width + 1, (count,), generator=generator)


def gather_windows(tokens: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) tokens and (B,) start offsets -> (B, width) windows."""
    return tokens[starts[:, None] + torch.arange(width)]


class RandomWindows(IterableDataset):
    """Endless batches (B, block_size + 1) of random windows, starting at batch ``start``.

    With data parallelism (``world`` processes), step n draws one batch of ``world`` x B windows and
    process ``rank`` takes its B of them: together the processes train on exactly the batch one
    process with ``world`` x B would.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        self.tokens, self.width, self.batch_size = tokens, block_size + 1, batch_size
        self.seed, self.start, self.rank, self.world = seed, start, rank, world

    def generator(self, n: int) -> torch.Generator:
        """The generator batch ``n`` is drawn from: a function of (seed, n) only."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + n)

    def batch(self, n: int) -> torch.Tensor:
        starts = _window_starts(len(self.tokens), self.width, self.batch_size * self.world, self.generator(n))
        return gather_windows(self.tokens, self.mine(starts), self.width)

    def mine(self, drawn: torch.Tensor) -> torch.Tensor:
        """This process's B of the ``world`` x B items drawn for a step."""
        return drawn[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __iter__(self):
        n = self.start
        while True:
            yield self.batch(n)
            n += 1


class RandomExamples(RandomWindows):
    """Endless batches (B, T+1) of whole examples: rows of ``examples`` (N, T+1), drawn by step as
    :class:`RandomWindows` draws windows (same seeding, resume and data-parallel split)."""

    def __init__(self, examples: torch.Tensor, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        super().__init__(examples, examples.shape[1] - 1, batch_size, seed, start, rank, world)

    def batch(self, n: int) -> torch.Tensor:
        rows = torch.randint(len(self.tokens), (self.batch_size * self.world,), generator=self.generator(n))
        return self.tokens[self.mine(rows)]


def fixed_windows(tokens: torch.Tensor, block_size: int, count: int, seed: int = 0) -> torch.Tensor:
    """(count, block_size + 1) windows at offsets fixed by ``seed``: the validation set."""
    g = torch.Generator().manual_seed(seed)
    return gather_windows(tokens, _window_starts(len(tokens), block_size + 1, count, g), block_size + 1)
