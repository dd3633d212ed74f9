"""Unix sockets that are never reachable with a wider mode than they end up with.

Both the device plugin sockets and the control socket are bound in a fresh 0700 directory beside
their path, given their mode, then renamed into place: bound in place, a socket exists with the
umask's mode until a chmod (0777 under umask 0), and the process-wide umask cannot be changed
safely while other threads create files.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


def bind_private(path: Path, bind: Callable[[Path], None], mode: int = 0o600) -> None:
    """Call `bind` with a temporary path in a fresh 0700 directory beside `path`, set `mode` on
    the socket made there, then rename it to `path` (replacing what is there, a link included,
    never following it).

    Raises:
        OSError: the directory cannot be made, or `bind`, the chmod or the rename failed.
    """
    private = Path(tempfile.mkdtemp(prefix=".s", dir=path.parent))
    temporary = private / "s"
    try:
        bind(temporary)
        os.chmod(temporary, mode)
        os.rename(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        os.rmdir(private)
