"""Data: the embedded synthetic language, synthetic tasks with answers, character-level text and UD EWT."""

from locallearn.data.base import TokenDataModule
from locallearn.data.ewt import EWTDataModule
from locallearn.data.synthetic import Grammar, SyntheticDataModule
from locallearn.data.tasks import InductionDataModule, KHopDataModule, MQARDataModule, TaskDataModule
from locallearn.data.text import TextDataModule

__all__ = ["EWTDataModule", "Grammar", "InductionDataModule", "KHopDataModule", "MQARDataModule",
           "SyntheticDataModule", "TaskDataModule", "TextDataModule", "TokenDataModule"]
