"""Hostile config files written over a live `gpushare run` process, with the kubelet stand-in.

After each: Allocate kept answering in under 50 ms while the reload ran, the old list is still
served (no new list sent), the error is one short line, the next good file is applied (within
10 s: the watch is woken by inotify and looks every second anyway, so a file that is never
picked up is what this catches; how fast a reload lands is measured by `python -m benchmarks
reload`); and SIGTERM ends the process within 4 s, even in the middle of a reload (a stop that
waited for the config reader would take its 5 s read timeout).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.daemon.config_reader import READ_TIMEOUT_S
from tests.fakes.kubelet import FakeKubelet

ROOT = Path(__file__).resolve().parents[1]
RESOURCE = "nvidia.com/gpu"
ALLOCATE_LIMIT_S = 0.050
APPLY_LIMIT_S = 10.0
SIGTERM_LIMIT_S = READ_TIMEOUT_S - 1.0  # 4 s: a stop that waited for the reader takes 5 s
# A reload that blocked serving would slow an Allocate in every window. On a machine whose CPUs
# are oversubscribed by other work, one call in a window can wait > 50 ms for a CPU whatever the
# daemon does (seen with no reload running too), so the same hostile write is repeated up to
# WINDOWS times and one window must be clean.
WINDOWS = 3


def time_slicing(replicas: int) -> str:
    """A good config: every GPU of the DGX A100 (8) shared `replicas` times."""
    return (
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        f"      - name: {RESOURCE}\n        replicas: {replicas}\n"
    )


def alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "version: v1\nflags:\n  migStrategy:\n" + "".join(f"    {line}\n" for line in lines)


def never_firing_schedule(entries: int = 256) -> str:
    """The good config plus a MIG schedule whose entries never fire (no April 31st)."""
    schedule = "".join(f'    - cron: "0 0 31 4,6,9,11 *"\n      config: c{i}\n'
                       for i in range(entries))
    return (time_slicing(4) + "migReconfiguration:\n  configFile: /nonexistent/mig.yaml\n"
            "  schedule:\n" + schedule)


def replace_with(path: Path, make: Callable[[Path], object]) -> None:
    """Put something new at `path` in one rename, as a ConfigMap update does."""
    staged = path.with_name(f".staged-{path.name}")
    if staged.is_dir() and not staged.is_symlink():
        staged.rmdir()
    else:
        staged.unlink(missing_ok=True)
    make(staged)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif staged.is_dir() and not staged.is_symlink():
        path.unlink(missing_ok=True)  # a directory cannot be renamed over a file
    os.replace(staged, path)


def text(content: str | bytes) -> Callable[[Path], object]:
    data = content.encode() if isinstance(content, str) else content
    return lambda p: p.write_bytes(data)


HOSTILE = [
    pytest.param(text(alias_bomb()), "more than 10,000 values", id="alias bomb"),
    pytest.param(text(time_slicing(1_000_000_000)), "must be <= 1024, got 1000000000",
                 id="replicas 1e9"),
    pytest.param(text(time_slicing(10_000)), "must be <= 1024, got 10000", id="replicas 10000"),
    pytest.param(text("version: v1\nflags:\n  migStrategy: " + "[" * 1000 + "]" * 1000 + "\n"),
                 "nested deeper than 32 levels", id="1000 levels deep"),
    pytest.param(lambda p: os.mkfifo(p), "not a regular file (a FIFO)", id="FIFO"),
    pytest.param(lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device)",
                 id="link to /dev/zero"),
    pytest.param(lambda p: p.mkdir(), "not a regular file (a directory)", id="directory"),
    pytest.param(text(time_slicing(4).replace(RESOURCE, "g" * 100_000)),
                 "a value of 100,000 characters", id="100 KB name"),
    pytest.param(text(time_slicing(4) + "version: v1\n"), 'duplicate key "version"',
                 id="duplicate key"),
    pytest.param(text(bytes(range(256)) * 4), "not a text file", id="binary"),
    pytest.param(text(""), "the file is empty", id="empty file"),
    pytest.param(text(never_firing_schedule()),
                 'migReconfiguration.schedule[0].cron: "0 0 31 4,6,9,11 *" never fires',
                 id="256 schedule entries never firing"),
]


class LiveDaemon:
    """`gpushare run` as a process on a simulated DGX A100, its log collected line by line."""

    def __init__(self, tmp_path: Path, kubelet_dir: Path, sim_node: Path) -> None:
        self.config = tmp_path / "config.yaml"
        self.config.write_text(time_slicing(4))
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "run", "--config", str(self.config),
             "--node", str(sim_node), "--kubelet-dir", str(kubelet_dir)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def failures(self) -> list[str]:
        with self._cond:
            return [line for line in self.lines if "reload of " in line and " failed: " in line]

    def wait_for_failures(self, count: int, timeout_s: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.failures()) < count:
                left = deadline - time.monotonic()
                assert left > 0, "no 'reload … failed' line; log:\n" + "\n".join(self.lines[-20:])
                self._cond.wait(left)
        return self.failures()

    def terminate(self) -> float:
        """SIGTERM; seconds until the process ended."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        took = time.monotonic() - sent
        self._reader.join(5)
        return took


@pytest.fixture
def sim_node(tmp_path: Path) -> Path:
    from sharing.nvml.sim import create_state

    return create_state("dgx-a100", tmp_path / "node")


@pytest.fixture
def live(tmp_path: Path, kubelet_dir: Path, sim_node: Path,
         kubelet: FakeKubelet) -> Iterator[LiveDaemon]:
    """A running daemon whose 32 devices the kubelet has seen."""
    daemon = LiveDaemon(tmp_path, kubelet_dir, sim_node)
    try:
        kubelet.wait_for_list(RESOURCE, lambda d: len(d.devices) == 32, 30.0)
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.terminate()


class AllocateProbe:
    """Calls Allocate for one device, again and again on its own thread, timing each answer."""

    def __init__(self, kubelet: FakeKubelet, device_id: str) -> None:
        self._kubelet = kubelet
        self._ids = [[device_id]]
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AllocateProbe:
        # The latencies are the daemon's: a collection of this test process's own heap must not
        # stop the probe's clock in the middle of a call.
        gc.disable()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        gc.enable()

    def wait_for_calls(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` calls have been answered (a busy CPU spaces them more than 10 ms)."""
        deadline = time.monotonic() + timeout_s
        while len(self.latencies) < count and self._thread.is_alive():
            assert time.monotonic() < deadline, f"{len(self.latencies)} Allocate calls answered"
            time.sleep(0.01)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            response = self._kubelet.allocate_ids(RESOURCE, self._ids)
            self.latencies.append(time.perf_counter() - began)
            assert len(response.container_responses) == 1
            self._stop.wait(0.01)


@pytest.mark.parametrize(("make", "expected"), HOSTILE)
def test_hostile_file_changes_nothing_and_serving_goes_on(
    live: LiveDaemon, kubelet: FakeKubelet, make: Callable[[Path], object], expected: str
) -> None:
    """Written over the live config: Allocate < 50 ms while the reload runs, old list kept,
    one-line error, the next good file applied within 10 s, SIGTERM ends the process in 4 s."""
    lists_before = len(kubelet.lists(RESOURCE))
    device = kubelet.latest(RESOURCE).devices[0].id  # type: ignore[union-attr]
    slowest: list[float] = []
    for attempt in range(1, WINDOWS + 1):
        with AllocateProbe(kubelet, device) as probe:
            time.sleep(0.05)
            replace_with(live.config, make)
            failure = live.wait_for_failures(attempt)[-1]
            time.sleep(0.1)  # and a little after the reload ended
            probe.wait_for_calls(5)
        assert len(probe.latencies) >= 5
        slowest.append(max(probe.latencies))
        if slowest[-1] < ALLOCATE_LIMIT_S:
            break
    assert min(slowest) < ALLOCATE_LIMIT_S, f"slowest Allocate per reload: {slowest}"
    assert expected in failure, failure
    message = failure.split(" failed: ", 1)[1]
    assert len(message) < 500
    assert not any("Traceback" in line for line in live.lines)
    assert len(kubelet.lists(RESOURCE)) == lists_before  # nothing new sent
    assert len(kubelet.latest(RESOURCE).devices) == 32  # type: ignore[union-attr]

    written = time.monotonic()
    replace_with(live.config, text(time_slicing(2)))
    latest = kubelet.wait_for_list(RESOURCE, lambda d: len(d.devices) == 16,
                                 APPLY_LIMIT_S + 5)
    applied = latest.at - written
    assert applied < APPLY_LIMIT_S, f"good file applied after {applied:.2f}s"

    took = live.terminate()
    assert took < SIGTERM_LIMIT_S, f"SIGTERM took {took:.2f}s"
    assert live.process.returncode == 0


def test_sigterm_during_a_reload_ends_the_process_within_4s(
    live: LiveDaemon, kubelet: FakeKubelet
) -> None:
    """SIGTERM right after a change lands (the reload thread and its reader at work): < 4 s."""
    replace_with(live.config, text(alias_bomb()))
    time.sleep(0.25)  # the config watch polls every 0.2 s: the reload has begun
    replace_with(live.config, text(time_slicing(3)))
    time.sleep(0.21)
    took = live.terminate()
    assert took < SIGTERM_LIMIT_S, f"SIGTERM took {took:.2f}s"
    assert live.process.returncode == 0
    assert any("stopped; sockets removed" in line for line in live.lines)
