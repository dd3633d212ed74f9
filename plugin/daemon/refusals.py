"""Rate-limited logging of refused requests: the first few in full, then a count.

A client that sends thousands of bad requests must not fill the node's disk with log lines:
within each window the first `burst` refusals are logged, the rest only counted, and the count
is logged when the next window begins (or when the server stops).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

REFUSALS_LOGGED_PER_WINDOW = 10
REFUSAL_WINDOW_S = 60.0


class RateLimitedLog:
    """Warnings about one subject (e.g. a resource's refused requests), at most `burst` per window.

    Thread-safe; never blocks on anything but its own short lock.
    """

    def __init__(
        self,
        logger: logging.Logger,
        subject: str,
        *,
        burst: int = REFUSALS_LOGGED_PER_WINDOW,
        window_s: float = REFUSAL_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        self._log = logger
        self._extra = dict(extra or {})
        self._subject = subject
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._logged = 0
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Warnings counted but not logged in the current window."""
        return self._suppressed

    def warning(self, message: str) -> None:
        """Log `message`, or count it when this window's burst is spent."""
        lines: list[str] = []
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self._window_s:
                lines += self._summary_locked()
                self._window_start, self._logged = now, 0
            if self._logged < self._burst:
                self._logged += 1
                lines.append(message)
                if self._logged == self._burst:
                    lines.append(
                        f"{self._burst} {self._subject} in {self._window_s:g}s: further ones "
                        "are counted, not logged, until the window ends"
                    )
            else:
                self._suppressed += 1
        for line in lines:
            self._log.warning("%s", line, extra=self._extra)

    def flush(self) -> None:
        """Log the count of warnings not logged yet (on stop)."""
        with self._lock:
            lines = self._summary_locked()
        for line in lines:
            self._log.warning("%s", line, extra=self._extra)

    def _summary_locked(self) -> list[str]:
        if not self._suppressed:
            return []
        count, self._suppressed = self._suppressed, 0
        return [f"{count:,} more {self._subject} were not logged"]
