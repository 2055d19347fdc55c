"""Where generated and downloaded data lives, and writing files there atomically.

Several processes (a sweep, the ranks of one distributed job) may create the same cache file at once, and a
run may be killed mid-write. Writing to a temporary file in the same directory, fsyncing it and renaming it
over the target means readers only ever see a missing file or a complete one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from scalelab.config import DataConfig

ENV_CACHE = "SCALELAB_CACHE"


def cache_dir(cfg: DataConfig) -> Path:
    """The data cache: ``cfg.cache_dir``, else ``$SCALELAB_CACHE``, else ``~/.cache/scalelab``."""
    raw = cfg.cache_dir or os.environ.get(ENV_CACHE) or "~/.cache/scalelab"
    return Path(raw).expanduser()


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for binary writing; on success it replaces ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is left untouched.

    Example:
        >>> with atomic_writer(Path("out.bin")) as f:   # doctest: +SKIP
        ...     f.write(b"payload")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so os.replace is a rename within one filesystem (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform lets you open a directory, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
