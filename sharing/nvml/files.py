"""Files gpushare keeps and files it is given, at the I/O edge.

`read_regular_text`: the text of a file a user names (a config, a mig-parted file), bounded:
opening never blocks (a FIFO is refused, not waited on), only regular files are read, and at
most `limit` + 1 bytes whatever the path names (a link to /dev/zero is refused too).

`open_regular`: a state file gpushare keeps, opened the same non-blocking way (regular files
only); the caller bounds what it reads.

`write_atomic`: whole-file replacement; a reader sees the old file or the new one, never part
of either. Only a regular file (or a symbolic link) is replaced: a device, FIFO, socket or
directory at the path is refused (an output file named /dev/null must not become a file).

Every state file gpushare keeps (the MIG journal, the job history, the node labels file, the
CDI spec, the simulated node's state) is written this way: a temporary file beside the target,
written, optionally flushed to disk, given its mode, then renamed over the target. A failure
leaves the old file in place and no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnreadableFile(ValueError):
    """The file cannot be read as bounded text; the message says why, without the path."""


def read_regular_text(path: str | Path, limit: int, what: str) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; `what` names it in messages
    ("config file", "mig-parted file").

    Raises:
        UnreadableFile: missing, unreadable, not a regular file, too large or not UTF-8 text.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise UnreadableFile(f"cannot read the {what}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        kind = next((name for test, name in _KINDS if test(mode)), None)
        if kind is not None or not stat.S_ISREG(mode):
            raise UnreadableFile(f"not a regular file ({kind or 'unknown type'})")
        data = _read_at_most(fd, limit + 1)
    except OSError as err:
        raise UnreadableFile(f"cannot read the {what}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnreadableFile(f"the file is larger than {limit:,} bytes, the limit for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnreadableFile(
            f"not a text file (not UTF-8 at byte {err.start:,}: {err.reason})"
        ) from None


def open_regular(path: str | Path) -> BinaryIO:
    """Open a state file gpushare keeps for binary reading, without ever blocking: a FIFO or
    device planted at its path is refused (opening a FIFO waited for a writer forever).

    Raises:
        FileNotFoundError: nothing is there.
        OSError: unreadable, or not a regular file (`strerror` says which kind it is).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "unknown type")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_special(path: Path) -> None:
    """OSError when `path` exists as something a rename must not replace (a device such as
    /dev/null named as an output file, a FIFO, a socket, a directory); a regular file or a
    symbolic link may be replaced."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EEXIST
    raise OSError(code, f"exists and is {kind}, not a regular file: not replaced")


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from a file descriptor."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


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
        OSError: the directory cannot be created or written, or the path is not a regular file.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
    except FileExistsError:  # its "File exists" is about a file where a directory must be
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a directory") from None
    _refuse_special(path)
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
