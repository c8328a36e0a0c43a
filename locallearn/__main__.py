"""``python -m locallearn [overrides]``: train, as ``locallearn-train`` and ``python run.py`` do."""

from locallearn.main import entry

if __name__ == "__main__":  # not in a spawned worker, which imports this module again
    entry()
