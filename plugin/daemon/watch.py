"""Watching the kubelet directory and the config file: inotify, polling only as a fallback.

A `PollLoop` runs a cheap `step()` (an os.stat or two) on its own thread whenever it is woken,
and at the latest every `interval_s`. A `DirectoryEvents` thread wakes it on every change of an
entry in one directory, through inotify (the `watchfiles` library); the loop's interval is then
only a slow safety tick. Where inotify cannot be used (no inotify, the watch limit reached, the
directory gone) the loop polls every `poll_s` instead, says so once in the log, and inotify is
tried again every few seconds.

The config file is watched through its directory, not itself: a ConfigMap volume updates a file
by swapping the `..data` symlink, which a watch on the file would miss.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gpushare.daemon")

TICK_S = 1.0  # with inotify: how often the loop looks anyway (retries, missed events)
RETRY_INOTIFY_S = 5.0  # while polling: how often inotify is tried again
DEBOUNCE_MS = 100  # the longest a burst of changes is gathered before the loop is woken
CHECK_MS = 250  # how often the inotify thread checks that its directory is still the same


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of a file (symlinks followed), or None when it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _dir_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a directory, or None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class PollLoop:
    """A daemon thread calling `step()` when woken and every `interval_s`; failures are logged."""

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        *,
        poll_s: float,
        delay_first: bool = True,
    ) -> None:
        self.name = name
        self.interval_s = poll_s
        self._step = step
        self._delay_first = delay_first
        self._stopped = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread."""
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the step soon, without waiting for the interval (any thread)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and wait for it; safe to call twice."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        if self._delay_first:
            self._pause()
        while not self._stopped:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("%s: unexpected error; going on", self.name)
            self._pause()

    def _pause(self) -> None:
        self._wake.wait(self.interval_s)
        self._wake.clear()


class DirectoryEvents:
    """Wakes a PollLoop on every change in one directory (inotify); polls where it cannot."""

    def __init__(
        self,
        directory: Path,
        loop: PollLoop,
        *,
        poll_s: float,
        step_ms: int,
        inotify: bool = True,
        tick_s: float = TICK_S,
        retry_s: float = RETRY_INOTIFY_S,
    ) -> None:
        self.directory = directory
        self._loop = loop
        self._poll_s = poll_s
        self._tick_s = tick_s
        self._step_ms = step_ms
        self._retry_s = retry_s
        self._enabled = inotify
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problem: str | None = None  # why inotify is not used now (logged once)
        self.using_inotify = False

    @property
    def alive(self) -> bool:
        """True while the loop runs (and the inotify thread, when inotify is enabled)."""
        events_ok = not self._enabled or (self._thread is not None and self._thread.is_alive())
        return self._loop.alive and events_ok

    def start(self) -> None:
        """Start the loop, and the inotify thread unless inotify is disabled."""
        self._loop.interval_s = self._poll_s
        self._loop.start()
        if not self._enabled:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"{self._loop.name}-events", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop both threads; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._loop.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch()
            except Exception as err:  # noqa: BLE001 - watchfiles raises OSError or RuntimeError
                self._fall_back(f"{type(err).__name__}: {err}")
            else:
                continue
            self._stop.wait(self._retry_s)

    def _watch(self) -> None:
        """Wake the loop on each batch of changes until stopped or the directory is replaced."""
        import watchfiles

        seen = _dir_identity(self.directory)
        if seen is None:
            raise FileNotFoundError(f"{self.directory} does not exist")
        changes_seen = watchfiles.watch(
            self.directory, watch_filter=None, recursive=False, stop_event=self._stop,
            step=self._step_ms, debounce=DEBOUNCE_MS, rust_timeout=CHECK_MS,
            yield_on_timeout=True, raise_interrupt=False, force_polling=False,
            poll_delay_ms=max(10, int(self._poll_s * 1000)),
        )
        itself = os.path.abspath(self.directory)
        for changes in changes_seen:
            if not self.using_inotify:
                self._inotify_works()
            if changes:
                self._loop.wake()
            # A removed directory's watch is dead, even when a new one reuses its inode.
            gone = any(os.path.abspath(path) == itself for _, path in changes)
            if gone or _dir_identity(self.directory) != seen:
                self._loop.wake()
                raise FileNotFoundError(f"{self.directory} was removed or replaced")

    def _inotify_works(self) -> None:
        self.using_inotify = True
        self._loop.interval_s = self._tick_s
        self._loop.wake()  # changes made before the watch was in place
        if self._problem is not None:
            log.info("%s: watching %s with inotify again", self._loop.name, self.directory)
            self._problem = None

    def _fall_back(self, problem: str) -> None:
        self.using_inotify = False
        self._loop.interval_s = self._poll_s
        self._loop.wake()
        if problem != self._problem:
            log.warning("%s: inotify unavailable for %s (%s): polling every %.0f ms",
                        self._loop.name, self.directory, problem, self._poll_s * 1000)
        self._problem = problem


class FileWatcher:
    """Calls `on_change` from its own thread when a file's inode, size or mtime changes.

    The file's directory is watched with inotify, so an edit in place, a rename over the file
    and a ConfigMap `..data` symlink swap are all seen at once; a file reached through a symlink
    into another directory is still checked every `TICK_S`.
    """

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], object],
        *,
        poll_s: float,
        inotify: bool = True,
        step_ms: int = 50,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._seen = file_identity(path)
        self._loop = PollLoop("config-watch", self._check, poll_s=poll_s)
        self._events = DirectoryEvents(
            path.parent, self._loop, poll_s=poll_s, step_ms=step_ms, inotify=inotify
        )

    @property
    def alive(self) -> bool:
        """True while the watch threads run."""
        return self._events.alive

    def start(self) -> None:
        """Start watching."""
        self._events.start()

    def stop(self) -> None:
        """Stop watching; safe to call twice."""
        self._events.stop()

    def _check(self) -> None:
        current = file_identity(self.path)
        if current != self._seen:
            self._seen = current
            log.info("%s changed: reloading", self.path)
            self._on_change()
