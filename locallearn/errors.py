"""The package's own exceptions, which ``run.py`` prints as one line without a traceback.

:class:`ConfigError` is bad user input, raised before any long work starts, with one sentence that
names the value, what was expected and how to fix it. :class:`TrainingDiverged` stops a run whose
loss diverged, naming the chunk and the step; its checkpoints and summary are kept.
:class:`PipelineError` stops a ``mode=pipeline`` run whose chunk process died, naming the chunk.
:class:`OutputError` stops a run that cannot write its outputs (a full disk, a read-only directory);
everything written before is intact.
"""


class ConfigError(ValueError):
    """A configuration value that cannot work."""


class TrainingDiverged(RuntimeError):
    """A chunk's loss diverged; training stopped. The message names the chunk, the step and what to try."""


class PipelineError(RuntimeError):
    """A chunk's process of a ``mode=pipeline`` run died; the others were stopped, checkpoints kept."""


class OutputError(RuntimeError):
    """A run's outputs could not be written; the message names the file, ``paths.log_dir`` and what is intact."""
