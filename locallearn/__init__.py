"""locallearn: local learning in transformers.

A transformer is cut into K chunks; each chunk trains only on its own local loss and no gradient
crosses a chunk boundary. ``chunks=1`` is ordinary end-to-end backprop through the same code.
"""

from locallearn.config import register_resolvers

register_resolvers()  # conf/ uses ${ll.*}; tests and scripts compose it after importing the package

__version__ = "0.1.0"

# The library API (locallearn/api.py, docs/api.md), imported on first use: `import locallearn` stays light for the
# command line's quick paths (--help, a refused option) and for the resolvers above.
_API = {"GPTConfig", "GPT", "ChunkPlan", "ChunkedGPT", "LinearHead", "MLPHead", "BlockHead", "sequential_backward",
        "joint_backward", "Sequential", "Joint", "PipelineStrategy", "compose", "train"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module("locallearn.api"), name)
    raise AttributeError(f"module 'locallearn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
