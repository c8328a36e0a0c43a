"""What runs and probe analyses call the text they read, in directory names, summaries and tables: one rule each."""

from pathlib import Path

GENERIC_STEMS = {"input", "train", "data", "corpus", "text", "all"}  # file stems that do not name a corpus


def corpus_name(path) -> str:
    """A corpus's name from its path: the file's stem, the folder's name for a folder or a generic stem
    (``input.txt`` of ``tinyshakespeare/`` is "tinyshakespeare")."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.stem.lower() in GENERIC_STEMS else path.stem


def treebank_name(path) -> str:
    """A treebank's name: UD's file prefix ("en_gum" of en_gum-ud-test.conllu) of its test file (in the folder, or
    among the files given), else the folder's name."""
    paths = [Path(p).expanduser() for p in ([path] if isinstance(path, (str, Path)) else path)]
    files = sorted(p for d in paths for p in (d.glob("*.conllu") if d.is_dir() else [d]))
    named = [p.stem.split("-ud-")[0] for p in files if "-ud-" in p.stem]
    if named:
        return named[0]
    first = paths[0]
    return (first if first.is_dir() else first.parent).resolve().name
