"""Whole-file replacement: a reader sees the old file or the new one, never part of either.

Every state file gpushare keeps (the MIG journal, the job history, the node labels file, the
CDI spec, the simulated node's state) is written this way: a temporary file beside the target,
written, optionally flushed to disk, given its mode, then renamed over the target. A failure
leaves the old file in place and no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(
    path: Path,
    data: bytes | str,
    *,
    mode: int = 0o600,
    durable: bool = False,
    mtime_ns: int | None = None,
    parent_mode: int = 0o755,
) -> None:
    """Replace `path` by a file holding `data` in one rename.

    `durable` flushes the file and its directory to disk (a power loss keeps it); `mtime_ns`
    sets the new file's modification time before it appears; a missing directory is created
    with `parent_mode`.

    Raises:
        OSError: the directory cannot be created or written.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
