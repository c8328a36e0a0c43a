"""The one exception type for bad user input.

Raised before any long work starts, with one sentence that names the value, what was expected and
how to fix it. ``run.py`` prints it without a traceback.
"""


class ConfigError(ValueError):
    """A configuration value that cannot work."""
