"""Data: the embedded synthetic language and character-level text corpora."""

from locallearn.data.base import TokenDataModule
from locallearn.data.synthetic import Grammar, SyntheticDataModule
from locallearn.data.text import TextDataModule

__all__ = ["Grammar", "SyntheticDataModule", "TextDataModule", "TokenDataModule"]
