"""Daemon lifecycle and concurrency over real unix sockets: the kubelet watch, reloads, streams."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from plugin.api import pb, pb_grpc
from plugin.daemon import convert
from plugin.daemon import server as server_module
from plugin.daemon.core import Daemon
from plugin.daemon.kubelet import KubeletLink
from plugin.daemon.server import create_server
from plugin.daemon.state import NodeState
from sharing.plan_types import Plan
from tests.fakes.kubelet import FakeKubelet
from tests.test_e2e_servers import time_sliced
from tests.test_reload import make_daemon, time_slicing

IDLE_S = 3600.0  # a poll interval that leaves a watch thread idle, so the test drives it


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The config file, first with 4 replicas per GPU."""
    path = tmp_path / "config.yaml"
    path.write_text(time_slicing(4))
    return path


@pytest.fixture
def idle_daemon(
    config: Path, kubelet_dir: Path, tmp_path: Path, kubelet: FakeKubelet
) -> Iterator[Daemon]:
    """A registered daemon whose kubelet watch and config watch stay idle after their first look."""
    daemon = make_daemon(
        config, kubelet_dir, tmp_path, config_poll_s=IDLE_S, kubelet_poll_s=IDLE_S,
        inotify=False,
    )
    daemon.start()
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 32)
    yield daemon
    daemon.stop()


def test_resource_added_by_a_reload_during_a_kubelet_poll_is_registered(
    idle_daemon: Daemon, kubelet: FakeKubelet, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that lands between the watch reading our sockets and registering is not lost."""
    daemon = idle_daemon
    read = daemon.socket_names
    calls = 0

    def sockets_then_reload() -> dict[str, str]:
        nonlocal calls
        calls += 1
        names = read()
        if calls == 1:  # the reload renames the resource right after the watch looked
            config.write_text(time_slicing(4, rename=True))
            assert daemon.reload()
        return names

    monkeypatch.setattr(daemon.link, "_sockets", sockets_then_reload)
    daemon.link.poll_once()
    daemon.link.poll_once()
    kubelet.wait_for(lambda: "nvidia.com/gpu.shared" in kubelet.resources(), 10.0)
    assert daemon.link.wait_registered(10.0)
    assert len(kubelet.wait_for_list("nvidia.com/gpu.shared", lambda _: True).devices) == 32


class RefusingKubelet(FakeKubelet):
    """A kubelet stand-in that refuses every registration while `refuse` is set."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.refuse = True
        self.attempts = 0
        super().__init__(kubelet_dir)

    def Register(  # noqa: N802 (gRPC method name)
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with self._cond:
            self.attempts += 1
        if self.refuse:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "registration refused")
        return super().Register(request, context)


def test_refused_registration_backs_off_and_is_logged_once(
    kubelet_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kubelet that keeps refusing: tries at 0, 0.5, 1.5, 3.5 s..., one warning, then success."""
    name, socket = "example.com/thing", "gpushare-thing.sock"
    server = create_server(name, kubelet_dir / socket, state=NodeState(), allocator=lambda _: None)
    server.start()
    kubelet = RefusingKubelet(kubelet_dir)
    now = [0.0]
    link = KubeletLink(kubelet_dir, sockets=lambda: {name: socket},
                       restart_servers=lambda _names: server.start(),
                       retry_s=0.5, max_retry_s=2.0, clock=lambda: now[0])
    link.request([name])
    tried_at: list[float] = []
    try:
        with caplog.at_level(logging.DEBUG, logger="gpushare.kubelet"):
            for step in range(80):  # 8 s of polls, 0.1 s apart
                now[0] = step / 10
                before = kubelet.attempts
                link.poll_once()
                if kubelet.attempts > before:
                    tried_at.append(now[0])
            assert tried_at == [0.0, 0.5, 1.5, 3.5, 5.5, 7.5]  # doubling, capped at 2 s
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1
            assert name in warnings[0].getMessage()
            assert "registration refused" in warnings[0].getMessage()
            kubelet.refuse = False
            now[0] = 9.5
            link.poll_once()
            assert link.wait_registered(0)
            assert kubelet.resources() == [name]
            assert "after 6 failed attempts" in caplog.records[-1].getMessage()
    finally:
        kubelet.stop()
        server.stop()


def test_stopping_a_server_ends_its_list_and_watch_stream_at_once(
    kubelet_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() wakes the stream waiting for a change: stop() does not sit out its grace period."""
    monkeypatch.setattr(server_module, "STREAM_POLL_S", 60.0)  # only a wake-up can end the wait
    resource = time_sliced(2)
    server = create_server(resource.name, kubelet_dir / resource.socket_name,
                           state=NodeState(Plan(resources=(resource,))), allocator=lambda _: None)
    server.start()
    received: list[int] = []
    first, ended = threading.Event(), threading.Event()

    def read() -> None:
        with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
            try:
                for message in pb_grpc.DevicePluginStub(channel).ListAndWatch(convert.empty()):
                    received.append(len(message.devices))
                    first.set()
            except grpc.RpcError:
                pass
        ended.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(5.0)
        assert received == [8]
        began = time.monotonic()
        server.stop(grace_s=10.0)
        assert time.monotonic() - began < 5.0
        assert ended.wait(5.0)
    finally:
        server.stop()
        reader.join(10)
    assert not server.socket_path.exists()


def hold_reload(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> tuple[
    threading.Event, threading.Event, threading.Thread
]:
    """A reload on its own thread that read config and node, then waits for `release`."""
    build = daemon._build
    entered, release = threading.Event(), threading.Event()

    def build_then_wait(config: object) -> object:
        result = build(config)
        if threading.current_thread().name == "held-reload":
            entered.set()
            assert release.wait(5.0)
        return result

    monkeypatch.setattr(daemon, "_build", build_then_wait)
    held = threading.Thread(target=daemon.reload, name="held-reload")
    held.start()
    assert entered.wait(5.0)
    return entered, release, held


def test_an_older_reload_finishing_last_does_not_undo_a_newer_one(
    idle_daemon: Daemon, kubelet: FakeKubelet, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config watch and SIGHUP reloads overlap: the plan and the listeners end on the newest."""
    daemon = idle_daemon
    heard: list[int] = []
    daemon.add_plan_listener(lambda plan, _inv: heard.append(len(plan.resources[0].devices)))
    config.write_text(time_slicing(3))
    _, release, held = hold_reload(daemon, monkeypatch)  # read 3 replicas, not applied yet
    config.write_text(time_slicing(2))
    assert daemon.reload()
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 16)
    release.set()
    held.join(5.0)
    assert not held.is_alive()
    assert len(daemon.plan.resources[0].devices) == 16
    assert heard == [32, 16]
    assert len(daemon.state.snapshot("nvidia.com/gpu")[1] or ()) == 16


def test_a_reload_finishing_after_stop_serves_nothing(
    idle_daemon: Daemon, kubelet_dir: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() during a reload: the reload's new resource is not served, no socket is left."""
    daemon = idle_daemon
    config.write_text(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        "      - {name: nvidia.com/gpu, replicas: 4, devices: [0, 1, 2, 3]}\n"
        "      - {name: nvidia.com/gpu, rename: vgpu, replicas: 2, devices: [4, 5, 6, 7]}\n"
    )
    _, release, held = hold_reload(daemon, monkeypatch)  # adds nvidia.com/vgpu
    daemon.stop()
    release.set()
    held.join(5.0)
    assert not held.is_alive()
    assert daemon.socket_names() == {}
    assert sorted(p.name for p in kubelet_dir.iterdir()) == ["kubelet.sock"]
    daemon.stop()  # twice is safe


@pytest.mark.parametrize("method", ["Allocate", "GetPreferredAllocation"])
def test_request_without_containers_is_invalid_argument_and_serving_goes_on(
    idle_daemon: Daemon, kubelet: FakeKubelet, kubelet_dir: Path, method: str
) -> None:
    """No container requests: INVALID_ARGUMENT naming the resource; the next request is served."""
    empty = {"Allocate": pb.AllocateRequest(),
             "GetPreferredAllocation": pb.PreferredAllocationRequest()}[method]
    with grpc.insecure_channel(f"unix://{kubelet_dir / 'gpushare-gpu.sock'}") as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            getattr(stub, method)(empty, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nvidia.com/gpu" in (refused.value.details() or "")
    assert "no container requests" in (refused.value.details() or "")
    assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses


TWO_RESOURCES = """\
version: v1
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        rename: nvidia.com/gpu.shared
        devices: [0, 1, 2, 3]
        replicas: 2
"""


def test_a_server_that_cannot_restart_is_logged_once_and_spares_the_others(
    config: Path, kubelet_dir: Path, tmp_path: Path, kubelet: FakeKubelet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Restarting one server whose directory is gone: one ERROR line, the other server untouched."""
    config.write_text(TWO_RESOURCES)
    daemon = make_daemon(config, kubelet_dir, tmp_path, config_poll_s=IDLE_S,
                         kubelet_poll_s=IDLE_S, inotify=False)
    daemon.start()
    moved = kubelet_dir.with_name(kubelet_dir.name + "-away")
    try:
        kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 4)
        other = (kubelet_dir / "gpushare-gpu.sock").stat().st_ino
        kubelet_dir.rename(moved)  # nothing can be bound in the kubelet directory now
        with caplog.at_level(logging.DEBUG, logger="gpushare.daemon"):
            for _ in range(3):
                daemon.restart_servers(["nvidia.com/gpu.shared"])
            moved.rename(kubelet_dir)
            daemon.restart_servers(["nvidia.com/gpu.shared"])
        failures = [r for r in caplog.records if "restarting the server of" in r.message]
        assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
        assert "nvidia.com/gpu.shared" in failures[0].message
        assert "restarted the servers of nvidia.com/gpu.shared" in caplog.text
        assert (kubelet_dir / "gpushare-gpu.shared.sock").exists()
        assert (kubelet_dir / "gpushare-gpu.sock").stat().st_ino == other
    finally:
        if moved.exists():
            moved.rename(kubelet_dir)
        daemon.stop()


def test_only_servers_whose_socket_is_gone_are_restarted(
    kubelet_dir: Path, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    """The kubelet watch restarts just the resource whose socket vanished, and says so once."""
    names = {"example.com/a": "gpushare-a.sock", "example.com/b": "gpushare-b.sock"}
    servers = {
        n: create_server(n, kubelet_dir / s, state=NodeState(), allocator=lambda _: None)
        for n, s in names.items()
    }
    for server in servers.values():
        server.start()
    asked: list[list[str]] = []
    link = KubeletLink(kubelet_dir, sockets=lambda: names,
                       restart_servers=lambda missing: asked.append(list(missing)))
    try:
        link.poll_once()
        (kubelet_dir / names["example.com/b"]).unlink()
        with caplog.at_level(logging.DEBUG, logger="gpushare.kubelet"):
            link.poll_once()
            link.poll_once()  # still missing: asked again, logged at debug only
        assert asked == [["example.com/b"], ["example.com/b"]]
        seen = [r for r in caplog.records if "kubelet restart seen" in r.message]
        assert [r.levelno for r in seen] == [logging.INFO, logging.DEBUG]
        assert "sockets of example.com/b removed" in seen[0].message
    finally:
        for server in servers.values():
            server.stop()
