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


class FileWatcher:
    """Calls `on_change` from its own thread when a file's inode, size or mtime changes."""

    def __init__(self, path: Path, on_change: Callable[[], object], *, poll_s: float) -> None:
        self.path = path
        self._on_change = on_change
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = file_identity(path)

    def start(self) -> None:
        """Start polling."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="config-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            current = file_identity(self.path)
            if current != self._seen:
                self._seen = current
                log.info("%s changed: reloading", self.path)
                try:
                    self._on_change()
                except Exception:  # noqa: BLE001 - the watch must outlive any one failure
                    log.exception("reload after a change of %s failed", self.path)
