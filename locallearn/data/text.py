"""Character-level corpora from any UTF-8 text file."""

from pathlib import Path

import torch

from locallearn.data.base import TokenDataModule
from locallearn.errors import ConfigError


class TextDataModule(TokenDataModule):
    """A text file -> character tokens; the first 90% train, the rest validation (by default).

    The vocabulary is every distinct character of the file, sorted; it is saved with the run.
    """

    name = "text"

    def __init__(self, path, batch_size: int, block_size: int, val_fraction: float = 0.1, **kwargs):
        super().__init__(batch_size, block_size, **kwargs)
        if path is None:
            raise ConfigError("data.path is not set; pass data.path=FILE with a UTF-8 text file.")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"data.path={self.path} does not exist or is not a file; pass an existing text file.")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1.")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"data.path={self.path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
        if not text:
            raise ConfigError(f"data.path={self.path} is empty; pass a file with text in it.")
        self.vocab = sorted(set(text))
        stoi = {ch: i for i, ch in enumerate(self.vocab)}
        tokens = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
        n_train = int(len(tokens) * (1 - val_fraction))
        self.train_tokens, self.val_tokens = tokens[:n_train], tokens[n_train:]
        self.check_length(f"data.path={self.path} ({len(tokens):,} characters, val_fraction={val_fraction})")

    def encode(self, s: str) -> list[int]:
        stoi = {ch: i for i, ch in enumerate(self.vocab)}
        return [stoi[ch] for ch in s]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)
