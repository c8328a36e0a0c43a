"""Atomic file writes: every result file and checkpoint appears whole or not at all.

A file is written to a temporary file *in the same directory* (so the final rename never crosses a
filesystem, where ``rename`` would fail with EXDEV and a copy would truncate the good file first),
flushed and fsynced, then renamed over the target with :func:`os.replace`; the directory is fsynced
so that the rename itself survives a power cut. A kill or a full disk at any instant leaves the
previous version of the file readable (and at worst a hidden ``.<name>.*.tmp`` file beside it; the
error paths this process survives remove it).

Everything the package writes goes through :func:`atomic_open` (or the helpers below it):
checkpoints (:class:`locallearn.training.checkpoint.AtomicCheckpointIO`), JSON/YAML/CSV/Markdown results and
PNG figures. TensorBoard event files are append-only logs and are left to TensorBoard.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

_UMASK = os.umask(0)  # read once: mkstemp creates files 0600, a finished file gets the usual permissions
os.umask(_UMASK)
_fdopen = os.fdopen  # the one place bytes go to disk (tests replace it with a disk that fills up)


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # some filesystems cannot open or fsync a directory; the rename is done either way
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None) -> Iterator:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes). If the block raises (or the write fails: a full disk),
    ``path`` is untouched and the temporary file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        text = mode == "w"
        with _fdopen(fd, mode, encoding=encoding if text else None, newline=newline if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name the one we meant
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)


def write_text(path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path, obj, indent: int = 2, **kwargs) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def save_figure(fig, path, dpi: int = 120) -> Path:
    """``fig.savefig`` through :func:`atomic_open` (the format follows the file's suffix)."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path
