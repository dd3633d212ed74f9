"""The reload thread: config edits and SIGHUP ask for a reload; one thread does them in turn.

Requests never block (the config watch and the signal handler only set a flag). Requests that
arrive while a reload runs are merged into one more reload after it; and when that reload is
still reading the file, the read is abandoned (`cancel`) so the newest file is read at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sharing.text import shorten

log = logging.getLogger("gpushare.daemon")

STOP_WAIT_S = 1.0  # stop() waits this long for a reload to notice; the thread is a daemon


class ReloadLoop:
    """Runs `reload()` on its own thread whenever asked; `cancel()` abandons a read in flight."""

    def __init__(self, reload: Callable[[], object], cancel: Callable[[], None]) -> None:
        self._reload = reload
        self._cancel = cancel
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._busy = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name="reload", daemon=True)
            self._thread.start()

    def request(self) -> None:
        """Ask for a reload; a read still in flight is abandoned for the newer one."""
        with self._lock:
            if self._stopped:
                return
            self._wanted.set()
            busy = self._busy
        if busy:
            self._cancel()

    def stop(self) -> None:
        """End the thread (a read in flight is abandoned); safe to call twice."""
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
            self._wanted.set()
        self._cancel()
        if thread is not None:
            thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            with self._lock:
                if self._stopped:
                    return
                self._wanted.clear()
                self._busy = True
            try:
                self._reload()
            except Exception as err:  # noqa: BLE001 - the thread must outlive any one reload
                log.error("reload: unexpected error (%s: %s); the running plan stays",
                          type(err).__name__, shorten(str(err), 200))
                log.debug("reload error", exc_info=True)
            finally:
                with self._lock:
                    self._busy = False
