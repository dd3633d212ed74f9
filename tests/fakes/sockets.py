"""Short temporary directories for unix sockets (paths are limited to ~107 bytes), and a
client that trickles bytes into one."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
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


class Trickle:
    """A client that sends one byte every `every_s` and never a newline, until it is answered
    or `give_up_s` passes; `answered_after` is when the answer came (None: never)."""

    def __init__(self, path: Path, every_s: float = 0.1, give_up_s: float = 6.0) -> None:
        self.answer: dict | None = None
        self.answered_after: float | None = None
        self._path, self._every_s, self._give_up_s = path, every_s, give_up_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self._path))
            sock.settimeout(self._every_s)
            data = b""
            while time.monotonic() - began < self._give_up_s:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass  # the server gave up on us and closed; its answer may be waiting
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break  # closed without an answer
                data += chunk
                if data.endswith(b"\n"):
                    self.answered_after = time.monotonic() - began
                    self.answer = json.loads(data)
                    return
