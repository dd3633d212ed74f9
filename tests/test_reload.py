"""Reload without restart: config edits and SIGHUP apply the Plan diff; bad files change nothing."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.daemon.core import Daemon
from tests.fakes.kubelet import FakeKubelet


def time_slicing(replicas: int, *, rename: bool = False) -> str:
    """A time-slicing config for nvidia.com/gpu."""
    return (
        "version: v1\nsharing:\n  timeSlicing:\n"
        f"    renameByDefault: {str(rename).lower()}\n"
        f"    resources:\n      - name: nvidia.com/gpu\n        replicas: {replicas}\n"
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The config file, first with 4 replicas per GPU."""
    path = tmp_path / "config.yaml"
    path.write_text(time_slicing(4))
    return path


def make_daemon(config: Path, kubelet_dir: Path, tmp_path: Path, **kwargs: object) -> Daemon:
    """A daemon on a fresh simulated DGX A100 (8 GPUs)."""
    from sharing.nvml import load_library
    from sharing.nvml.sim import create_state

    state = tmp_path / "node"
    create_state("dgx-a100", state)
    return Daemon(config_path=config, kubelet_dir=kubelet_dir,
                  nvml_lib=load_library(str(state)), env={}, overrides={}, **kwargs)


@pytest.fixture
def daemon(
    config: Path, kubelet_dir: Path, tmp_path: Path, kubelet: FakeKubelet
) -> Iterator[Daemon]:
    """A running daemon whose 32 devices the kubelet has seen."""
    daemon = make_daemon(config, kubelet_dir, tmp_path)
    daemon.start()
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 32)
    yield daemon
    daemon.stop()


def test_more_replicas_reach_the_kubelet_on_the_open_stream_without_registering_again(
    daemon: Daemon, kubelet: FakeKubelet, config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """replicas 4 -> 8: the open stream carries 64 devices (how soon is measured by `bench
    --only reload`, not timed here); one registration only; the log line names the resource in
    its text and in its `resource` field."""
    caplog.set_level(logging.INFO, logger="gpushare.daemon")
    edited = time.monotonic()
    config.write_text(time_slicing(8))
    latest = kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 64, 10.0)
    took = latest.at - edited
    assert took < 10.0, f"new list took {took:.3f}s"
    assert len(kubelet.registrations_of("nvidia.com/gpu")) == 1
    assert {d.id.split("::")[1] for d in latest.devices} == {str(n) for n in range(8)}
    [line] = [r for r in caplog.records if "now has" in r.getMessage()]
    assert line.getMessage() == "nvidia.com/gpu now has 64 devices: new list sent to the kubelet"
    assert line.resource == "nvidia.com/gpu"  # type: ignore[attr-defined]


def test_broken_edit_keeps_the_old_plan_and_logs_file_and_field(
    daemon: Daemon, kubelet: FakeKubelet, config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """replicas: 1 is refused: 32 devices still served, the error names file and field."""
    caplog.set_level(logging.ERROR, logger="gpushare.daemon")
    lists_before = len(kubelet.lists("nvidia.com/gpu"))
    config.write_text(time_slicing(1))
    deadline = time.monotonic() + 10.0  # the reload reads the file in a child process
    while daemon.reload_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.reload_failures == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert message == (f"reload of {config} failed: sharing.timeSlicing.resources[0].replicas:"
                       " must be >= 2, got 1")
    assert len(daemon.plan.resources[0].devices) == 32
    assert len(kubelet.lists("nvidia.com/gpu")) == lists_before
    assert len(kubelet.latest("nvidia.com/gpu").devices) == 32
    assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses
    config.write_text(time_slicing(2))
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 16, 10.0)


def test_reload_without_a_change_says_so(
    daemon: Daemon, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload that changes nothing (SIGHUP, a file touched) logs that, and sends nothing."""
    caplog.set_level(logging.INFO, logger="gpushare.daemon")
    lists_before = len(kubelet.lists("nvidia.com/gpu"))
    assert daemon.reload()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("reload: nothing changed (nvidia.com/gpu)") == 1, messages
    assert not [m for m in messages if "now has" in m or "serving" in m], messages
    assert len(kubelet.lists("nvidia.com/gpu")) == lists_before


def long_name(kubelet_dir: Path) -> str:
    """A valid resource name (<= 63 characters) whose socket path in `kubelet_dir` is one byte
    longer than a unix socket path can be (107)."""
    part = 108 - len(f"{kubelet_dir}/gpushare-.sock")
    assert 0 < part <= 63 - len("a.io/")
    return "a.io/" + "g" * part


def test_reload_to_a_name_too_long_for_a_socket_changes_nothing(
    config: Path, kubelet_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rename whose socket path would not fit is refused like any bad config, naming the
    resource; the old plan keeps serving (before, the reload failed at grpc's bind)."""
    deep = kubelet_dir / ("d" * 30)  # the default /var/lib/kubelet/device-plugins is 32 bytes
    deep.mkdir()
    # The file watch idle (as in test_sighup_reloads), so only this reload reads the edit.
    daemon = make_daemon(config, deep, tmp_path, config_poll_s=3600.0, inotify=False)
    daemon.start()
    try:
        caplog.set_level(logging.ERROR, logger="gpushare.daemon")
        name = long_name(deep)
        config.write_text(time_slicing(4).replace(
            "- name: nvidia.com/gpu\n", f"- name: nvidia.com/gpu\n        rename: {name}\n"))
        assert not daemon.reload()
        [record] = caplog.records
        assert record.getMessage().startswith(
            f"reload of {config} failed: {name}: its socket {deep}/gpushare-g")
        assert "would be 108 bytes, and unix socket paths hold at most 107" in record.getMessage()
        assert daemon.plan.names == ("nvidia.com/gpu",)
        assert sorted(p.name for p in deep.iterdir()) == ["gpushare-gpu.sock"]
    finally:
        daemon.stop()


def test_renamed_resource_is_served_and_the_old_one_stopped(
    daemon: Daemon, kubelet: FakeKubelet, config: Path, kubelet_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """renameByDefault: nvidia.com/gpu.shared registered on its socket, gpushare-gpu.sock gone;
    the log says which resource stopped and which started, in the `resource` field too."""
    caplog.set_level(logging.INFO, logger="gpushare.daemon")
    config.write_text(time_slicing(4, rename=True))
    kubelet.wait_for(lambda: "nvidia.com/gpu.shared" in kubelet.resources(), 10.0)
    assert kubelet.registrations_of("nvidia.com/gpu.shared")[0].endpoint == (
        "gpushare-gpu.shared.sock"
    )
    assert len(kubelet.wait_for_list("nvidia.com/gpu.shared", lambda _: True).devices) == 32
    assert not (kubelet_dir / "gpushare-gpu.sock").exists()
    assert daemon.plan.names == ("nvidia.com/gpu.shared",)
    resources = {r.getMessage(): getattr(r, "resource", None) for r in caplog.records}
    assert resources["stopped serving nvidia.com/gpu"] == "nvidia.com/gpu"
    assert resources["serving nvidia.com/gpu.shared (32 devices) on gpushare-gpu.shared.sock"] == (
        "nvidia.com/gpu.shared"
    )


def wait_for_handlers(timeout_s: float = 10.0) -> None:
    """Wait until run_forever has installed its signal handlers (no event says so: poll).

    The daemon is registered before run_forever starts, so without this a SIGHUP could arrive
    while the default action, ending the process, still holds.
    """
    deadline = time.monotonic() + timeout_s
    while signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None):
        assert time.monotonic() < deadline, "run_forever installed no signal handlers"
        time.sleep(0.01)


def test_sighup_reloads(
    config: Path, kubelet_dir: Path, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    """With the file watch idle, SIGHUP alone applies the edit; SIGTERM then stops cleanly."""
    daemon = make_daemon(config, kubelet_dir, tmp_path, config_poll_s=3600.0, inotify=False)
    daemon.start()
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 32)
            config.write_text(time_slicing(3))
            wait_for_handlers()
            os.kill(os.getpid(), signal.SIGHUP)
            kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 24)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            errors.append(err)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    assert daemon.run_forever() == 0
    driver.join()
    assert errors == []
    assert len(kubelet.registrations_of("nvidia.com/gpu")) == 1
    assert not (kubelet_dir / "gpushare-gpu.sock").exists()
