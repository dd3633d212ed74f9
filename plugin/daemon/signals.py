"""Signals of `gpushare run`: SIGTERM and SIGINT stop the daemon cleanly, SIGHUP reloads."""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any, Protocol

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Signalled(Protocol):
    """What the handlers ask of the daemon (both safe from a signal handler)."""

    def request_stop(self) -> None:
        """Ask for a clean stop."""

    def request_reload(self) -> None:
        """Ask for a reload."""


def install_signals(daemon: Signalled) -> dict[int, Any]:
    """SIGTERM/SIGINT stop the daemon, SIGHUP reloads; returns the previous handlers.

    Handlers can only be installed from the main thread; elsewhere nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            daemon.request_reload()
        else:
            daemon.request_stop()

    return {s: signal.signal(s, on_signal) for s in SIGNALS}


def restore_signals(previous: Mapping[int, Any]) -> None:
    """Put back the handlers install_signals replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
