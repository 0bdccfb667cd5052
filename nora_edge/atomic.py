"""Atomic file writes: a temp file in the destination's folder, flushed, then ``os.replace``; and the one
JSON-object reader (:func:`read_json_object`) the checkpoint, bundle and FAST loaders share.

Every file nora-edge writes (bundle pieces, codec tables, reports, plots) goes through here, so a reader
never sees half a file. Temp files get the usual 0666 & ~umask mode (mkstemp's 0600 would surprise a user).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask_mode() -> int:
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on normal exit it is fsynced and renamed to ``path``, else deleted.

    ``suffix`` matters to writers that append one when it is missing (``np.save`` -> ``.npy``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the data reaches the disk before the name does
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: object, *, indent: int = 2) -> Path:
    """Write ``data`` as JSON (with a trailing newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def read_json_object(path: str | os.PathLike[str], error: type[Exception]) -> dict:
    """Read a JSON object from ``path``; a missing, unreadable or non-JSON file, or a non-object, raises
    ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
