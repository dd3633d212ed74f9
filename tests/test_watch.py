"""Watches by inotify: a ConfigMap `..data` swap, kubelet restarts, and the polling fallback.

The loops here get a tick of an hour, so a change seen within the deadline was seen by inotify
(or, in the fallback tests, by polling every 50 ms), never by the safety tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.daemon.core import Daemon
from plugin.daemon.watch import DirectoryEvents, PollLoop
from plugin.standin.configmap import write_configmap
from tests.fakes.kubelet import FakeKubelet
from tests.test_reload import make_daemon, time_slicing

HOUR_S = 3600.0
WITHIN_S = 10.0  # generous for a busy machine, and far below the hour: inotify did it


class Steps:
    """A step function that counts its calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.calls += 1
            self._cond.notify_all()

    def wait_beyond(self, calls: int, timeout_s: float) -> float:
        """Wait until more than `calls` steps ran; returns the seconds waited."""
        start = time.monotonic()
        with self._cond:
            assert self._cond.wait_for(lambda: self.calls > calls, timeout_s), "no step in time"
        return time.monotonic() - start


@pytest.fixture
def watched(tmp_path: Path) -> Iterator:
    """Factory: DirectoryEvents on a directory with an hour-long tick; stopped afterwards."""
    made: list[DirectoryEvents] = []

    def watch(directory: Path, *, poll_s: float = HOUR_S, retry_s: float = HOUR_S,
              inotify: bool = True) -> tuple[DirectoryEvents, Steps]:
        steps = Steps()
        events = DirectoryEvents(
            directory, PollLoop("test-watch", steps, poll_s=poll_s), poll_s=poll_s,
            step_ms=20, inotify=inotify, tick_s=HOUR_S, retry_s=retry_s,
        )
        events.start()
        made.append(events)
        return events, steps

    yield watch
    for events in made:
        events.stop()


def settle(events: DirectoryEvents, steps: Steps) -> int:
    """Wait until inotify is in place (its first step), and return the step count then."""
    steps.wait_beyond(0, 5.0)
    deadline = time.monotonic() + 5
    while not events.using_inotify:
        assert time.monotonic() < deadline, "inotify never came up"
        time.sleep(0.01)
    time.sleep(0.05)
    return steps.calls


def test_configmap_symlink_swap_wakes_the_loop(watched: object, tmp_path: Path) -> None:
    configmap = tmp_path / "cm"
    write_configmap(configmap, {"config.yaml": "a"})
    events, steps = watched(configmap)  # type: ignore[operator]
    calls = settle(events, steps)
    write_configmap(configmap, {"config.yaml": "b"})
    steps.wait_beyond(calls, WITHIN_S)
    assert (configmap / "config.yaml").read_text() == "b"


def test_kubelet_style_socket_churn_wakes_the_loop(watched: object, tmp_path: Path) -> None:
    events, steps = watched(tmp_path)  # type: ignore[operator]
    calls = settle(events, steps)
    (tmp_path / "kubelet.sock").touch()
    steps.wait_beyond(calls, WITHIN_S)


def test_no_inotify_for_a_missing_directory_polls_then_watches_once_it_exists(
    watched: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "later"
    with caplog.at_level(logging.INFO, logger="gpushare.daemon"):
        events, steps = watched(directory, poll_s=0.05, retry_s=0.2)  # type: ignore[operator]
        steps.wait_beyond(3, WITHIN_S)  # polling every 50 ms
        assert not events.using_inotify
        directory.mkdir()
        calls = settle(events, steps)
        (directory / "x").touch()
        steps.wait_beyond(calls, WITHIN_S)
    messages = [r.getMessage() for r in caplog.records if "test-watch" in r.getMessage()]
    assert messages[0] == (
        f"test-watch: inotify unavailable for {directory} (FileNotFoundError: {directory} "
        "does not exist): polling every 50 ms"
    )
    assert messages[-1] == f"test-watch: watching {directory} with inotify again"
    assert len(messages) == 2  # said once each, though tried several times


def test_directory_replaced_is_watched_again(watched: object, tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    events, steps = watched(directory, poll_s=0.05, retry_s=0.1)  # type: ignore[operator]
    settle(events, steps)
    directory.rmdir()
    directory.mkdir()
    deadline = time.monotonic() + 5
    while not (events.using_inotify and steps.calls):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    calls = settle(events, steps)
    (directory / "y").touch()
    steps.wait_beyond(calls, WITHIN_S)


def test_inotify_off_polls(watched: object, tmp_path: Path) -> None:
    events, steps = watched(tmp_path, poll_s=0.05, inotify=False)  # type: ignore[operator]
    steps.wait_beyond(3, WITHIN_S)
    assert not events.using_inotify
    assert events.alive


# --- a daemon whose poll intervals are an hour: only inotify can be this quick ---------------


@pytest.fixture
def configmap_daemon(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet
) -> Iterator[tuple[Daemon, Path]]:
    configmap = tmp_path / "cm"
    write_configmap(configmap, {"config.yaml": time_slicing(4)})
    daemon = make_daemon(configmap / "config.yaml", kubelet_dir, tmp_path,
                         config_poll_s=HOUR_S, kubelet_poll_s=HOUR_S)
    daemon.start()
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 32)
    yield daemon, configmap
    daemon.stop()


def test_configmap_swap_is_applied_long_before_the_hourly_poll(
    configmap_daemon: tuple[Daemon, Path], kubelet: FakeKubelet
) -> None:
    _, configmap = configmap_daemon
    swapped = time.monotonic()
    write_configmap(configmap, {"config.yaml": time_slicing(8)})
    seen = kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 64, timeout_s=10)
    assert seen.at - swapped < 10.0  # polls are an hour apart: inotify did it (latency: bench)
    assert len(kubelet.registrations) == 1


def test_kubelet_restart_is_seen_by_inotify(
    configmap_daemon: tuple[Daemon, Path], kubelet: FakeKubelet
) -> None:
    kubelet.restart()
    restarted = time.monotonic()
    kubelet.wait_for(lambda: len(kubelet.registrations) == 2, timeout_s=10)
    assert kubelet.registrations[-1].at - restarted < 10.0  # the kubelet poll is an hour
    assert len(kubelet.wait_for_list("nvidia.com/gpu", lambda _: True).devices) == 32
