"""Polling a file for changes: a cheap os.stat, no inotify dependency."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gpushare.daemon")


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of a file, or None when it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class PollLoop:
    """A daemon thread calling `step()` every `poll_s` until stopped; a failing step is logged."""

    def __init__(
        self, name: str, step: Callable[[], object], *, poll_s: float, delay_first: bool = True
    ) -> None:
        self.name = name
        self._step = step
        self._poll_s = poll_s
        self._delay_first = delay_first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        if self._delay_first and self._stop.wait(self._poll_s):
            return
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("%s: unexpected error; going on", self.name)
            self._stop.wait(self._poll_s)


class FileWatcher:
    """Calls `on_change` from its own thread when a file's inode, size or mtime changes."""

    def __init__(self, path: Path, on_change: Callable[[], object], *, poll_s: float) -> None:
        self.path = path
        self._on_change = on_change
        self._seen = file_identity(path)
        self._loop = PollLoop("config-watch", self._check, poll_s=poll_s)

    def start(self) -> None:
        """Start polling."""
        self._loop.start()

    def stop(self) -> None:
        """Stop polling; safe to call twice."""
        self._loop.stop()

    def _check(self) -> None:
        current = file_identity(self.path)
        if current != self._seen:
            self._seen = current
            log.info("%s changed: reloading", self.path)
            self._on_change()
