"""Hostile inputs against a live `gpushare run` process (simulated DGX A100, kubelet stand-in):
control socket clients that trickle bytes or nest JSON, and a log written beside the config.

Each leaves the daemon serving, answering other control clients, and stopping on SIGTERM in
time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.daemon.control import MAX_CONNECTIONS, REQUEST_TIMEOUT_S
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import Trickle, short_dir

ROOT = Path(__file__).resolve().parents[1]
RESOURCE = "nvidia.com/gpu"
CONFIG = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
          f"      - name: {RESOURCE}\n        replicas: 4\n")
SIGTERM_LIMIT_S = 2.0


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Daemon:
    """`gpushare run` with its control socket in a short directory; output to `log`."""

    def __init__(self, base: Path, kubelet_dir: Path, log: Path, *args: str) -> None:
        from sharing.nvml.sim import create_state

        self.config = base / "config.yaml"
        self.config.write_text(CONFIG)
        self.socket = base / "control.sock"
        self.log = log
        node = create_state("dgx-a100", base / "node")
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "plugin.cli", "run", "--node", str(node),
                 "--config", str(self.config), "--kubelet-dir", str(kubelet_dir),
                 "--control-socket", str(self.socket), "--state-dir", str(base / "state"),
                 *args],
                cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
            )

    def status(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "plugin.cli", "mig", "status", "--control-socket",
             str(self.socket), "--format", "json"],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
        )

    def terminate(self) -> float:
        """SIGTERM; seconds until the process ended."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return time.monotonic() - sent


@pytest.fixture
def base() -> Iterator[Path]:
    with short_dir("gs-hi-") as path:
        yield path


def start(
    base: Path, kubelet_dir: Path, kubelet: FakeKubelet, log: Path, *args: str
) -> Daemon:
    daemon = Daemon(base, kubelet_dir, log, *args)
    try:
        kubelet.wait_for_list(RESOURCE, lambda d: len(d.devices) == 32, 30.0)
        deadline = time.monotonic() + 10
        while not daemon.socket.exists():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
    except BaseException:
        daemon.process.kill()
        daemon.process.wait()
        raise
    return daemon


def test_control_clients_that_trickle_or_nest_leave_the_daemon_serving_and_stopping(
    base: Path, kubelet_dir: Path, kubelet: FakeKubelet
) -> None:
    """A request nested 100,000 deep gets a one-line error; clients trickling a byte at a time
    in every slot are cut off at the request timeout, so `gpushare mig status` is answered;
    SIGTERM with such clients connected ends the process within 2 s."""
    daemon = start(base, kubelet_dir, kubelet, base / "daemon.log")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(daemon.socket))
            sock.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
            answer = json.loads(sock.makefile("rb").readline())
        assert answer == {"ok": False, "error": "bad request: JSON nested too deeply"}

        give_up_s = REQUEST_TIMEOUT_S + 20  # generous: a loaded machine starts processes slowly
        trickling = [Trickle(daemon.socket, every_s=0.5, give_up_s=give_up_s)
                     for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.5)
        began = time.monotonic()
        done = daemon.status()  # refused as busy (or not accepted) while every slot is held
        while done.returncode != 0 and time.monotonic() - began < give_up_s:
            time.sleep(0.5)
            done = daemon.status()
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["jobs"] == []
        for client in trickling:
            client.thread.join(give_up_s + 5)
            assert client.answer == {"ok": False, "error": "no complete request line in time"}

        response = kubelet.allocate(RESOURCE, 1)
        assert response is not None
        trickling = [Trickle(daemon.socket, every_s=0.2, give_up_s=30)
                     for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.5)
        took = daemon.terminate()
        assert took < SIGTERM_LIMIT_S, f"SIGTERM took {took:.2f}s"
        assert daemon.process.returncode == 0
    finally:
        if daemon.process.poll() is None:
            daemon.terminate()
    log = daemon.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_log_written_beside_the_config_file_does_not_feed_itself(
    base: Path, kubelet_dir: Path, kubelet: FakeKubelet
) -> None:
    """The daemon's output in the config file's directory: each line written there is a change
    the config watch sees, and must not log a line of its own (it grew forever, 10 a second)."""
    log = base / "daemon.log"  # beside base/config.yaml
    daemon = start(base, kubelet_dir, kubelet, log)
    try:
        time.sleep(1.5)
        size = log.stat().st_size
        time.sleep(2.0)
        grown = log.read_text()[size:]
        assert grown == "", f"the log grew by {len(grown)} bytes while idle:\n{grown[-1000:]}"
    finally:
        daemon.terminate()
    assert "change detected" not in log.read_text()


def nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"mig-jobs.json": nested, "mig-job-active.json": nested},
                     ["MIG job history {state}/mig-jobs.json unreadable (not JSON (nested too "
                      "deeply)); moved to mig-jobs.json.corrupt",
                      "unfinished MIG job unreadable: {state}/mig-job-active.json: not JSON "
                      "(nested too deeply); left in place"],
                     id="history and active job nested"),
        pytest.param({"mig-journal.json": nested},
                     ["{state}/mig-journal.json: corrupt MIG journal (nested too deeply)"],
                     id="journal nested"),
    ],
)
def test_state_files_nested_too_deeply_are_reported_and_the_daemon_serves(
    base: Path, kubelet_dir: Path, kubelet: FakeKubelet, files: dict, expected: list[str]
) -> None:
    """JSON nested 100,000 deep in a state file stopped the start with a RecursionError
    traceback: now each is one error line naming the file, handled as the corrupt file it is,
    and the daemon serves and stops on SIGTERM."""
    state = base / "state"
    state.mkdir(mode=0o700)
    for name, make in files.items():
        make(state / name)
    daemon = start(base, kubelet_dir, kubelet, base / "daemon.log")
    try:
        took = daemon.terminate()
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    log = daemon.log.read_text()
    for line in expected:
        assert line.format(state=state) in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert took < SIGTERM_LIMIT_S, f"SIGTERM took {took:.2f}s"
    assert daemon.process.returncode == 0


def test_a_labels_file_naming_a_fifo_or_device_is_left_alone(
    base: Path, kubelet_dir: Path, kubelet: FakeKubelet
) -> None:
    """--labels-file naming a FIFO (as /dev/null is a device) was renamed over by a regular
    file and removed on stop: `--labels-file /dev/null` would have deleted /dev/null. Now the
    write is refused in one line naming the path, and the FIFO is still there after stop."""
    labels = base / "labels"
    os.mkfifo(labels)
    daemon = start(base, kubelet_dir, kubelet, base / "daemon.log", "--labels-file", str(labels))
    took = daemon.terminate()
    log = daemon.log.read_text()
    assert (f"cannot write the node labels to {labels}: exists and is a FIFO, not a regular "
            "file: not replaced") in log, log[-3000:]
    assert stat.S_ISFIFO(os.lstat(labels).st_mode)
    assert took < SIGTERM_LIMIT_S
    assert daemon.process.returncode == 0


HUGE = "x" * 100_000


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        pytest.param(["--state-dir", "{base}/file"], {},
                     "gpushare run: state directory {base}/file: not a directory",
                     id="state dir is a file"),
        pytest.param(["--control-socket", "{base}/file/control.sock"], {},
                     "gpushare run: control socket {base}/file/control.sock: Not a directory",
                     id="control socket under a file"),
        pytest.param(["--kubelet-dir", f"/tmp/{HUGE}"], {},
                     "gpushare run: --kubelet-dir: a path of 100,005 characters; at most 4,096",
                     id="100 KB kubelet dir"),
        pytest.param([], {"CDI_SPEC_DIR": f"/tmp/{HUGE}"},
                     "gpushare run: --cdi-spec-dir (or $CDI_SPEC_DIR): a path of 100,005",
                     id="100 KB CDI_SPEC_DIR"),
        pytest.param([], {"DP_DISABLE_HEALTHCHECKS": f"13,{HUGE}"},
                     "gpushare run: DP_DISABLE_HEALTHCHECKS: invalid value 'xxx",
                     id="100 KB DP_DISABLE_HEALTHCHECKS"),
    ],
)
def test_bad_paths_and_variables_stop_the_start_in_one_short_line(
    base: Path, kubelet_dir: Path, kubelet: FakeKubelet, args: list[str], env: dict,
    expected: str,
) -> None:
    """Each names the option or variable and the path or value, cut short: no `File exists`
    for a file where a directory must be, no `[Errno 20]`, no 100 KB value echoed twice."""
    from sharing.nvml.sim import create_state

    (base / "file").write_text("a file\n")
    node = create_state("dgx-a100", base / "node")
    argv = [a.format(base=base) for a in args]
    defaults = {"--state-dir": str(base / "state"), "--control-socket": str(base / "c.sock")}
    for option, value in defaults.items():
        if option not in argv:
            argv += [option, value]
    done = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "run", "--node", str(node),
         "--kubelet-dir", str(kubelet_dir), *argv],
        cwd=ROOT, env={**child_env(), **env}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(expected.format(base=base)), last[:500]
    assert len(last) < 400, last[:500]
    assert "Traceback" not in done.stderr


def wait_for_line(log: Path, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log.read_text()[-2000:]}"
        time.sleep(0.05)


def test_a_kubelet_socket_that_is_not_a_socket_is_no_kubelet(
    base: Path, kubelet_dir: Path
) -> None:
    """A FIFO named kubelet.sock was dialed as the kubelet, every registration waiting out its
    2 s deadline (and a SIGTERM meanwhile with it); now it counts as no kubelet, said once."""
    os.mkfifo(kubelet_dir / "kubelet.sock")
    daemon = Daemon(base, kubelet_dir, base / "daemon.log")
    try:
        wait_for_line(daemon.log, f"kubelet.sock not a socket in {kubelet_dir}: waiting for "
                                  "the kubelet")
        time.sleep(3.0)  # a registration attempt would have failed by now
        took = daemon.terminate()
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    log = daemon.log.read_text()
    assert "registering nvidia.com/gpu" not in log, log[-2000:]
    assert took < SIGTERM_LIMIT_S, f"SIGTERM took {took:.2f}s"
    assert daemon.process.returncode == 0
