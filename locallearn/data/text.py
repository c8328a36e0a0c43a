"""Text corpora: any UTF-8 text file or folder of files, tokenized by the run's tokenizer (char, bpe or word).

:class:`TextCorpus` turns train / validation / test texts into token streams with :mod:`locallearn.data.tokenizer`
and keeps, per token, the characters it covers, so that losses per token become bits per character exactly.
:class:`TextDataModule` reads the texts from files; :class:`locallearn.data.ewt.EWTDataModule` from a treebank.
"""

import hashlib
from functools import cached_property
from pathlib import Path

import torch

from locallearn.data.base import TokenDataModule
from locallearn.data.tokenizer import TextTokenizer
from locallearn.data.windows import fixed_windows
from locallearn.errors import ConfigError
from locallearn.names import corpus_name


def read_text(path, key: str = "data.path") -> tuple[str, list[Path]]:
    """A file's text, or the texts of every file in a folder (sorted by path, hidden files left out) joined with
    a newline between files that lack one; also the files read."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                               p.relative_to(path).parts))
        if not files:
            raise ConfigError(f"{key}={path} is a folder with no files in it; pass a text file or a folder of them.")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{key}={path} does not exist; pass an existing text file or folder of text files.")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{key}: {f} is not UTF-8 text ({e.reason} at byte {e.start}); pass UTF-8 text "
                              f"files only.") from None
    text = "".join(p if p.endswith("\n") or i == len(parts) - 1 else p + "\n" for i, p in enumerate(parts))
    if not text:
        raise ConfigError(f"{key}={path} is empty; pass a file with text in it.")
    return text, files


class TextCorpus(TokenDataModule):
    """Train / validation (/ test) texts -> token streams with the run's tokenizer.

    The tokenizer is trained on the training text (its alphabet also holds the validation text's characters),
    or read from ``tokenizer_file`` (a resumed run's, or the run being evaluated). Subclasses call
    :meth:`set_texts` in their constructor, so bad input fails before training starts.
    """

    def __init__(self, batch_size: int, block_size: int, tokenizer: str = "char", vocab_size: int | None = None,
                 name: str | None = None, tokenizer_file=None, **kwargs):
        super().__init__(batch_size, block_size, **kwargs)
        self.tokenizer_kind, self.vocab_size_asked = tokenizer, vocab_size
        self.corpus, self.tokenizer_file = name, tokenizer_file
        self.tokenizer: TextTokenizer | None = None
        self.test_tokens = self.test_chars = None
        self.unknown: dict[str, int] = {}
        self.sources: dict[str, list[Path]] = {}

    def set_texts(self, train: str, val: str, test: str | None, where: str, alphabet: str = ""):
        if self.tokenizer_file:
            self.tokenizer = TextTokenizer.load(self.tokenizer_file)
        else:
            self.tokenizer = TextTokenizer.train(self.tokenizer_kind, [train], self.vocab_size_asked,
                                                 alphabet=val + alphabet)
        self.vocab = self.tokenizer.vocab
        streams = {}
        for split, text in (("train", train), ("val", val), ("test", test)):
            if text is None:
                continue
            enc = self.tokenizer.encode(text)
            streams[split] = (torch.from_numpy(enc.ids), torch.from_numpy(enc.chars))
            self.unknown[split] = enc.unknown
        (self.train_tokens, self.train_chars), (self.val_tokens, self.val_chars) = streams["train"], streams["val"]
        if "test" in streams:
            self.test_tokens, self.test_chars = streams["test"]
        self.check_length(where)

    # -- what the run records ---------------------------------------------------------------------------
    @cached_property  # the splits are fixed once built; every validation, the summary and the hparams read it
    def val_chars_per_token(self) -> float:
        """Characters per predicted token over the fixed validation windows (targets: positions 1..T), so that
        the mean validation loss per token, divided by this and ln 2, is their exact bits per character."""
        chars = fixed_windows(self.val_chars, self.block_size, self.val_windows, self.val_seed)[:, 1:]
        return float(chars.sum()) / chars.numel()

    @cached_property
    def provenance(self) -> dict:
        """The corpus's name, its files with their size and SHA-1, and the tokenizer: what summary.json records."""
        def files(paths):
            out = []
            for p in paths:
                data = p.read_bytes()
                out.append({"path": str(p.resolve()), "bytes": len(data), "sha1": hashlib.sha1(data).hexdigest()})
            return out
        return {"name": self.corpus, "tokenizer": self.tokenizer.name, "vocab_size": len(self.vocab),
                "files": {split: files(paths) for split, paths in self.sources.items()},
                "characters": {s: int(c.sum()) for s, c in (("train", self.train_chars), ("val", self.val_chars),
                                                              ("test", self.test_chars)) if c is not None},
                "tokens": {s: len(t) for s, t in (("train", self.train_tokens), ("val", self.val_tokens),
                                                  ("test", self.test_tokens)) if t is not None},
                "unknown": self.unknown}

    def save_vocab(self, run_dir):
        """``vocab.json`` and the tokenizer that made the ids, ``tokenizer.json``."""
        self.tokenizer.save(Path(run_dir) / "tokenizer.json")
        return super().save_vocab(run_dir)

    def describe(self) -> str:
        per = len(self.train_tokens) and float(self.train_chars.sum()) / len(self.train_tokens)
        unknown = {s: n for s, n in self.unknown.items() if n}
        text = (f"{self.corpus} ({self.tokenizer.name} tokens, {per:.2f} characters per token): "
                + super().describe().split(": ", 1)[1])
        if unknown:
            what = ("pieces read as <unk>" if self.tokenizer.kind == "word"
                    else f"characters outside the alphabet read as {self.tokenizer.fallback!r}")
            text += f"; {what}: " + ", ".join(f"{s} {n:,}" for s, n in unknown.items())
        return text

    def encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s).ids.tolist()

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


class TextDataModule(TextCorpus):
    """A text file or folder -> tokens; the first 90% train and the rest validation (by default), or separate
    validation and test files (``val_path``, ``test_path``)."""

    name = "text"

    def __init__(self, path, batch_size: int, block_size: int, val_fraction: float = 0.1, val_path=None,
                 test_path=None, **kwargs):
        super().__init__(batch_size, block_size, **kwargs)
        if path is None:
            raise ConfigError("data.path is not set; pass data.path=FILE with a UTF-8 text file (or a folder of them).")
        if val_path is None and not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1.")
        self.path = Path(path).expanduser()
        text, train_files = read_text(self.path)
        self.corpus = self.corpus or corpus_name(self.path)
        if val_path is None:
            n_train = int(len(text) * (1 - val_fraction))  # by characters, so every tokenizer sees the same split
            train, val = text[:n_train], text[n_train:]
            self.sources = {"train": train_files, "val": train_files}
            where = f"data.path={self.path} ({len(text):,} characters, val_fraction={val_fraction})"
        else:
            (val, val_files), train = read_text(val_path, "data.val_path"), text
            self.sources = {"train": train_files, "val": val_files}
            where = f"data.path={self.path} with data.val_path={val_path}"
        test = None
        if test_path is not None:
            test, self.sources["test"] = read_text(test_path, "data.test_path")
        self.set_texts(train, val, test, where)
