"""Daemon lifecycle and concurrency over real unix sockets: the kubelet watch, reloads, streams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.daemon import Daemon
from tests.fakes.kubelet import FakeKubelet
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
        config, kubelet_dir, tmp_path, config_poll_s=IDLE_S, kubelet_poll_s=IDLE_S
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
    kubelet.wait_for(lambda: "nvidia.com/gpu.shared" in kubelet.resources(), 2.0)
    assert daemon.link.wait_registered(2.0)
    assert len(kubelet.wait_for_list("nvidia.com/gpu.shared", lambda _: True).devices) == 32
