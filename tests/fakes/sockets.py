"""Short temporary directories for unix sockets (paths are limited to ~107 bytes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_dir(prefix: str = "gs-") -> Iterator[Path]:
    """A fresh directory directly under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
