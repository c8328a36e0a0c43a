"""Tokenizers for text corpora, ``data.tokenizer=char|bpe|word``: one interface over Hugging Face ``tokenizers``.

* ``char``: one token per character; the vocabulary is the corpus's alphabet, sorted.
* ``bpe``: byte-pair encoding over characters (not bytes), trained on the training split with ``vocab_size``
  tokens (the alphabet included).
* ``word``: the ``vocab_size`` - 1 most frequent pieces of the training split, and ``<unk>`` for the rest.

Rules every user of a tokenizer relies on (the probes, bits per character), stated once:

* Pieces (bpe, word): the text is first split by :data:`PIECES` (a run of letters with its leading space, a
  digit, a run of other symbols with its leading space, a run of whitespace), so every token is a substring of
  the text: tokens tile it, decoding is exact, and each token's characters are counted exactly.
* Unknown characters (char, bpe): a character outside the alphabet (the characters of the training and
  validation text) is read as a space, or as the alphabet's first character when it has no space, so a text
  keeps its length and every position; :meth:`TextTokenizer.encode` counts them. ``word`` needs no such rule: a
  piece outside its vocabulary is one ``<unk>`` token covering that piece's characters (counted too).

A tokenizer is saved with its run as ``tokenizer.json`` (the Hugging Face format, loadable with
``tokenizers.Tokenizer.from_file``) and read back from there on resume, by ``analysis/evaluate.py`` and by the
probes: nothing is downloaded, nothing is trained twice.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from locallearn.atomic import write_text
from locallearn.errors import ConfigError

KINDS = ("char", "bpe", "word")
DEFAULT_VOCAB = {"bpe": 1024, "word": 8192}
UNK = "<unk>"
# Pieces in the manner of GPT-2's pre-tokenizer, over characters: contractions, letters with their leading
# space, single digits, other symbols with their leading space, whitespace (its last space goes to the next word).
PIECES = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class Encoded:
    """A text as tokens: ids (N,), each token's character span [start, end) in the text, and how many
    characters (char, bpe) or pieces (word) were unknown."""

    ids: np.ndarray  # (N,) int64
    starts: np.ndarray  # (N,) int64, index of the token's first character
    ends: np.ndarray  # (N,) int64, one past its last character
    unknown: int

    @property
    def chars(self) -> np.ndarray:
        """(N,) characters of the text each token covers (they sum to the text's length)."""
        return self.ends - self.starts


class TextTokenizer:
    """A trained tokenizer: text -> :class:`Encoded`, ids -> text, saved as ``tokenizer.json``."""

    def __init__(self, hf: Tokenizer):
        self.hf = hf
        model = type(hf.model).__name__
        self.kind = "word" if model == "WordLevel" else "bpe" if hf.pre_tokenizer is not None else "char"
        ids = hf.get_vocab()
        self.vocab: list[str] = sorted(ids, key=ids.get)  # token strings by id
        if [ids[t] for t in self.vocab] != list(range(len(self.vocab))):
            raise ConfigError("the tokenizer's ids are not 0..vocab_size-1; retrain it with this package.")
        self.alphabet = {t for t in self.vocab if len(t) == 1} if self.kind != "word" else None
        self.fallback = " " if self.alphabet is None or " " in self.alphabet else min(self.alphabet or {" "})
        self.unk_id = ids.get(UNK)  # word only

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, kind: str, texts: list[str], vocab_size: int | None = None, alphabet: str = "") -> "TextTokenizer":
        """A ``kind`` tokenizer learned from ``texts`` (the training split); ``alphabet``: further characters to
        know (the validation text's), for char and bpe."""
        if kind not in KINDS:
            raise ConfigError(f"data.tokenizer={kind} is not a tokenizer; use one of {', '.join(KINDS)}.")
        if kind == "char":
            if vocab_size is not None:
                raise ConfigError(f"data.vocab_size={vocab_size} is set with data.tokenizer=char, whose vocabulary "
                                  f"is the corpus's characters; leave data.vocab_size=null or use data.tokenizer=bpe.")
            chars = sorted(set("".join(texts)) | set(alphabet))
            return cls(Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[])))
        size = DEFAULT_VOCAB[kind] if vocab_size is None else vocab_size
        chars = sorted(set("".join(texts)) | set(alphabet))
        low, why = (2, "<unk> and one word") if kind == "word" else (len(chars), "the corpus's distinct characters")
        if int(size) != size or size < low:
            raise ConfigError(f"data.vocab_size={vocab_size} is too small for data.tokenizer={kind}: it needs at "
                              f"least {low} tokens ({why}); raise it.")
        if kind == "bpe":
            hf = Tokenizer(models.BPE())
            trainer = trainers.BpeTrainer(vocab_size=int(size), initial_alphabet=chars, limit_alphabet=len(chars),
                                          special_tokens=[], show_progress=False)
        else:
            hf = Tokenizer(models.WordLevel(unk_token=UNK))
            trainer = trainers.WordLevelTrainer(vocab_size=int(size), special_tokens=[UNK], show_progress=False)
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; pass the tokenizer.json a run saved.")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_vocab(cls, vocab: list[str]) -> "TextTokenizer":
        """A character tokenizer with exactly these ids (runs saved before tokenizers: ``vocab.json`` only)."""
        return cls(Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=[])))

    def save(self, path) -> Path:
        return write_text(Path(path), self.hf.to_str(pretty=True))

    # -- use ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``char``, or the kind with its vocabulary size (``bpe-1024``): what tables and directory names say."""
        return "char" if self.kind == "char" else f"{self.kind}-{len(self.vocab)}"

    def __len__(self) -> int:
        return len(self.vocab)

    def known(self, text: str) -> tuple[str, int]:
        """``text`` with every character outside the alphabet replaced by the fallback, and how many were."""
        if self.alphabet is None:
            return text, 0
        unknown = set(text) - self.alphabet
        if not unknown:
            return text, 0
        count = sum(text.count(ch) for ch in unknown)
        return text.translate({ord(ch): self.fallback for ch in unknown}), count

    def encode(self, text: str) -> Encoded:
        text, unknown = self.known(text)
        if not text:
            empty = np.zeros(0, dtype=np.int64)
            return Encoded(empty, empty, empty, unknown)
        enc = self.hf.encode(text, add_special_tokens=False)
        spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if self.kind == "word":
            unknown = int((ids == self.unk_id).sum())
        if len(ids) and (spans[0, 0] != 0 or spans[-1, 1] != len(text) or (spans[1:, 0] != spans[:-1, 1]).any()):
            raise RuntimeError("the tokens do not tile the text; the tokenizer.json was not made by locallearn.")
        return Encoded(ids, spans[:, 0].copy(), spans[:, 1].copy(), unknown)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)
