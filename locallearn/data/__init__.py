"""Data: the embedded synthetic language, character-level text corpora and UD EWT sentences."""

from locallearn.data.base import TokenDataModule
from locallearn.data.ewt import EWTDataModule
from locallearn.data.synthetic import Grammar, SyntheticDataModule
from locallearn.data.text import TextDataModule

__all__ = ["EWTDataModule", "Grammar", "SyntheticDataModule", "TextDataModule", "TokenDataModule"]
