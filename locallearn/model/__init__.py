"""The model and its cut: a plain GPT (:mod:`.gpt`), the chunk plan (:mod:`.plan`), the chunked model with
the single gradient cut (:mod:`.chunked`), the auxiliary heads (:mod:`.heads`) and the objectives that turn a
batch and predictions into a loss (:mod:`.objectives`). Nothing here knows about Lightning or training.
"""

from locallearn.model.chunked import ChunkedGPT, make_net
from locallearn.model.gpt import GPT, GPTConfig
from locallearn.model.plan import ChunkPlan

__all__ = ["GPT", "GPTConfig", "ChunkPlan", "ChunkedGPT", "make_net"]
