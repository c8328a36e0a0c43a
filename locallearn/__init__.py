"""locallearn: local learning in transformers.

A transformer is cut into K chunks; each chunk trains only on its own local loss and no gradient
crosses a chunk boundary. ``chunks=1`` is ordinary end-to-end backprop through the same code.
"""

from locallearn.config import register_resolvers

register_resolvers()  # conf/ uses ${ll.*}; tests and scripts compose it after importing the package

__version__ = "0.1.0"
