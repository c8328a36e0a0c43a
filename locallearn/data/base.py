"""The LightningDataModule shared by every token corpus."""

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from locallearn.atomic import write_json
from locallearn.data.windows import RandomWindows, fixed_windows
from locallearn.errors import ConfigError


def own_generator() -> torch.Generator:
    # A DataLoader draws a seed from the global RNG whenever an iterator starts, unless it has a
    # generator of its own; that draw would shift the dropout masks of a resumed run.
    return torch.Generator().manual_seed(0)


class TokenDataModule(L.LightningDataModule):
    """Train/val token streams -> random training windows and a fixed validation set.

    Subclasses load or generate ``train_tokens``, ``val_tokens`` (1-D int64) and ``vocab`` (one
    string per token id) in their constructor, so bad input fails before training starts.
    """

    name = "tokens"

    def __init__(self, batch_size: int, block_size: int, seed: int = 0, val_windows: int = 512, val_seed: int = 0):
        super().__init__()
        for key, value in (("batch_size", batch_size), ("block_size", block_size), ("val_windows", val_windows)):
            if int(value) < 1:
                raise ConfigError(f"data.{key}={value} must be a positive integer.")
        self.batch_size, self.block_size = int(batch_size), int(block_size)
        self.seed, self.val_windows, self.val_seed = int(seed), int(val_windows), int(val_seed)
        self.train_tokens = self.val_tokens = self.test_tokens = None
        self.vocab: list[str] = []

    # Text corpora (locallearn/data/text.py) say what their tokens are made of; generated data has no characters.
    val_chars_per_token: float | None = None  # characters per predicted validation token: bits per character
    provenance: dict | None = None  # the corpus's name, files and tokenizer

    def check_length(self, where: str):
        """Raise unless both splits hold at least one window of ``block_size + 1`` tokens."""
        need = self.block_size + 1
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(tokens) < need:
                raise ConfigError(
                    f"{where} gives a {split} split of {len(tokens)} tokens, shorter than one window of "
                    f"data.block_size+1={need}; use a longer corpus or a smaller block_size."
                )

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def tokens_per_batch(self) -> int:
        """Predicted tokens per training step, over all data-parallel processes."""
        world = self.trainer.world_size if self.trainer is not None else 1
        return self.batch_size * self.block_size * world

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training split's token frequencies: the loss of a model without context."""
        p = torch.bincount(self.train_tokens, minlength=self.vocab_size).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())

    def train_dataloader(self):
        # Start at the trainer's step so that a resumed run continues with the very next batch.
        start = self.trainer.global_step if self.trainer is not None else 0
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        windows = RandomWindows(self.train_tokens, self.block_size, self.batch_size, self.seed, start, rank, world)
        return DataLoader(windows, batch_size=None, generator=own_generator())

    def val_dataloader(self):
        windows = fixed_windows(self.val_tokens, self.block_size, self.val_windows, self.val_seed)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False, generator=own_generator())

    def save_vocab(self, run_dir):
        """Write ``vocab.json`` (token strings by id) so a run's ids can be decoded later."""
        return write_json(Path(run_dir) / "vocab.json", {"data": self.name, "tokens": self.vocab}, indent=1,
                          ensure_ascii=False)

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens, "
            f"vocab {self.vocab_size}, unigram entropy {self.unigram_entropy():.3f} nats "
            f"({self.unigram_entropy() / math.log(2):.3f} bits)"
        )
