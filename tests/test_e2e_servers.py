"""Servers, kubelet link and kubelet stand-in over real unix sockets, on hand-made plans."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from plugin.daemon.allocate import build_allocators
from plugin.daemon.kubelet import KubeletLink
from plugin.daemon.server import PluginServer, create_server
from plugin.daemon.state import NodeState
from sharing.health import mps_key
from sharing.plan_types import Plan, ResourcePlan, ServeOptions, VirtualDevice
from tests.fakes.kubelet import FakeKubelet

GPUS = [f"GPU-e2e0000{i}-0000-4000-8000-00000000000{i}" for i in range(4)]


def time_sliced(replicas: int, name: str = "nvidia.com/gpu") -> ResourcePlan:
    """`replicas` replicas of 4 GPUs on 2 NUMA nodes."""
    devices = tuple(
        VirtualDevice(
            id=f"{uuid}::{n}", physical_id=uuid, gpu_uuid=uuid, gpu_index=i, replica=n,
            numa_node=i // 2, index_id=str(i), dev_paths=(f"/dev/nvidia{i}",),
        )
        for i, uuid in enumerate(GPUS)
        for n in range(replicas)
    )
    return ResourcePlan(
        name=name, original_name="nvidia.com/gpu", strategy="time-slicing", devices=devices,
        replicas=tuple((u, replicas) for u in GPUS),
    )


class Node:
    """NodeState, one server per resource and the kubelet link, wired as the daemon wires them."""

    def __init__(self, kubelet_dir: Path, plan: Plan) -> None:
        self.dir = kubelet_dir
        self.state = NodeState(plan)
        self.allocators = build_allocators(plan.resources, plan.options)
        self.servers: dict[str, PluginServer] = {}
        for res in plan.resources:
            server = create_server(res.name, kubelet_dir / res.socket_name, state=self.state,
                                   allocator=self.allocators.get)
            server.start()
            self.servers[res.name] = server
        self.restarts = 0
        self.link = KubeletLink(
            kubelet_dir,
            sockets=lambda: {n: s.socket_path.name for n, s in self.servers.items()},
            restart_servers=self.restart,
        )
        self.link.start()

    def restart(self, names: Sequence[str]) -> None:
        self.restarts += 1
        for name in names:
            self.servers[name].stop(0.05)
            self.servers[name].start()

    def stop(self) -> None:
        self.link.stop()
        for server in self.servers.values():
            server.stop()


def serve(kubelet_dir: Path, plan: Plan) -> Node:
    return Node(kubelet_dir, plan)


@pytest.fixture
def node(kubelet_dir: Path, kubelet: FakeKubelet) -> Iterator[Node]:
    """Two resources served and registered."""
    plan = Plan(resources=(time_sliced(2), time_sliced(3, "example.com/vgpu")))
    node = Node(kubelet_dir, plan)
    kubelet.wait_for(lambda: len(kubelet.resources()) == 2)
    yield node
    node.stop()


def test_registration_and_first_full_list(node: Node, kubelet: FakeKubelet) -> None:
    """Each resource registers with its socket name; the first list holds every device."""
    assert sorted((r.resource_name, r.endpoint, r.preferred_allocation)
                  for r in kubelet.registrations) == [
        ("example.com/vgpu", "gpushare-vgpu.sock", True),
        ("nvidia.com/gpu", "gpushare-gpu.sock", True),
    ]
    first = kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    assert [d.id for d in first.devices] == [d.id for d in time_sliced(2).devices]
    assert all(d.healthy for d in first.devices)
    assert [d.numa_node for d in first.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(kubelet.wait_for_list("example.com/vgpu", lambda _: True).devices) == 12


def test_socket_is_private(node: Node) -> None:
    """Our sockets are readable and writable by their owner only."""
    assert (node.dir / "gpushare-gpu.sock").stat().st_mode & 0o777 == 0o600


def test_overlay_pushes_unhealthy_replicas(node: Node, kubelet: FakeKubelet) -> None:
    """A GPU in the overlay turns all its replicas Unhealthy; clearing it heals them."""
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    node.state.set_overlay({GPUS[1]: "XID 79"})
    sick = kubelet.wait_for_list("nvidia.com/gpu", lambda d: d.unhealthy_ids != [])
    assert sick.unhealthy_ids == [f"{GPUS[1]}::0", f"{GPUS[1]}::1"]
    node.state.set_overlay({mps_key("example.com/vgpu"): "daemon down"})
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: d.unhealthy_ids == [])
    vgpu = kubelet.wait_for_list("example.com/vgpu", lambda d: d.healthy_ids == [])
    assert len(vgpu.unhealthy_ids) == 12


def test_allocate_through_the_kubelet_path(node: Node, kubelet: FakeKubelet) -> None:
    """GetPreferredAllocation (distributed) then Allocate, one response per container."""
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    got = kubelet.allocate("nvidia.com/gpu", 2, container_count=2)
    assert [len(ids) for ids in got.chosen] == [2, 2]
    assert len(got.response.container_responses) == 2
    for ids, response in zip(got.chosen, got.response.container_responses, strict=True):
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(i.split("::")[0] for i in ids)


def test_unknown_id_is_invalid_argument_and_serving_goes_on(
    node: Node, kubelet: FakeKubelet
) -> None:
    """An unknown ID is refused with INVALID_ARGUMENT naming it; the next request succeeds."""
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    with pytest.raises(grpc.RpcError) as info:
        kubelet.allocate_ids("nvidia.com/gpu", [["GPU-bogus::0"]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert '"nvidia.com/gpu"' in info.value.details()
    assert "GPU-bogus::0" in info.value.details()
    ok = kubelet.allocate_ids("nvidia.com/gpu", [[f"{GPUS[0]}::1"]])
    assert ok.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == GPUS[0]


def test_kubelet_restart_leads_to_registration_again(
    node: Node, kubelet: FakeKubelet
) -> None:
    """After the kubelet deletes every socket and re-creates kubelet.sock, we register again
    (how fast: `python -m benchmarks reregistration`)."""
    before = len(kubelet.registrations)
    started = time.monotonic()
    kubelet.restart()
    kubelet.wait_for(lambda: len(kubelet.registrations) >= before + 2, timeout_s=10.0)
    elapsed = max(r.at for r in kubelet.registrations) - started
    assert elapsed < 10.0, f"re-registration took {elapsed:.3f}s"
    assert (node.dir / "gpushare-gpu.sock").exists()
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses


def test_device_list_change_is_pushed_on_the_open_stream(
    node: Node, kubelet: FakeKubelet
) -> None:
    """A new plan for a served resource reaches the open stream; no new registration."""
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    registrations = len(kubelet.registrations)
    plan = replace(node.state.plan, resources=(time_sliced(4), time_sliced(3, "example.com/vgpu")))
    node.state.set_plan(plan)
    kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 16)
    assert len(kubelet.registrations) == registrations


def test_registration_waits_for_the_kubelet(kubelet_dir: Path) -> None:
    """With kubelet.sock absent the link waits; once it appears, every resource registers."""
    node = serve(kubelet_dir, Plan(resources=(time_sliced(2),),
                                   options=ServeOptions(device_id_strategy="index")))
    try:
        fake = FakeKubelet(kubelet_dir)
        try:
            fake.wait_for(lambda: fake.resources() == ["nvidia.com/gpu"], timeout_s=10)
            fake.wait_for_list("nvidia.com/gpu", lambda _: True)
            got = fake.allocate_ids("nvidia.com/gpu", [[f"{GPUS[2]}::0", f"{GPUS[3]}::1"]])
            assert got.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "2,3"
        finally:
            fake.stop()
    finally:
        node.stop()
    assert not (kubelet_dir / "gpushare-gpu.sock").exists()


def test_unchanged_resource_keeps_its_snapshot_version(node: Node) -> None:
    """Only resources whose list changed get a new version, so only their streams resend."""
    gpu_version, _ = node.state.snapshot("nvidia.com/gpu")
    vgpu_version, _ = node.state.snapshot("example.com/vgpu")
    node.state.set_plan(Plan(resources=(time_sliced(2), time_sliced(4, "example.com/vgpu"))))
    assert node.state.snapshot("nvidia.com/gpu")[0] == gpu_version
    assert node.state.snapshot("example.com/vgpu")[0] > vgpu_version
    assert node.state.snapshot("example.com/missing") == (-1, None)


def test_plugin_socket_never_exists_with_a_wider_mode(kubelet_dir: Path) -> None:
    """Under umask 0 a socket bound in place was 0777 until chmod, so another local user
    could connect meanwhile; it appears at its path already 0600. A thread watches the path
    while the server starts and stops again and again."""
    import os
    import stat
    import threading

    path = kubelet_dir / "gpushare-gpu.sock"
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.add(stat.S_IMODE(os.lstat(path).st_mode))
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch)
    old = os.umask(0)
    watcher.start()
    try:
        for _ in range(10):
            server = create_server("nvidia.com/gpu", path, state=NodeState(),
                                   allocator=lambda _: None)
            server.start()
            server.stop()
    finally:
        done.set()
        watcher.join()
        os.umask(old)
    assert seen == {0o600}
    assert sorted(p.name for p in kubelet_dir.iterdir()) == []


def test_socket_path_too_long_for_a_unix_socket_is_refused(tmp_path: Path) -> None:
    """A path the kubelet could not dial (over 107 bytes) is refused, though the temporary
    path it is bound at first is short enough (a long resource name in a long directory)."""
    path = tmp_path / f"gpushare-{'x' * 50}.sock"
    assert len(str(tmp_path)) + 13 <= 107 < len(str(path))
    server = create_server("nvidia.com/gpu", path, state=NodeState(), allocator=lambda _: None)
    with pytest.raises(OSError, match=r"path is \d+ bytes; unix socket paths are limited to 107"):
        server.start(ready_timeout_s=1.0)
    assert list(tmp_path.iterdir()) == []


def test_link_planted_at_the_socket_path_is_replaced_not_followed(
    kubelet_dir: Path, tmp_path: Path
) -> None:
    """gpushare-gpu.sock is a link to another file: the server replaces the link; the file it
    pointed to is neither removed nor bound over."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = kubelet_dir / "gpushare-gpu.sock"
    path.symlink_to(victim)
    server = create_server("nvidia.com/gpu", path, state=NodeState(), allocator=lambda _: None)
    server.start()
    try:
        assert victim.read_text() == "keep me"
        assert not path.is_symlink()
        assert path.is_socket()
    finally:
        server.stop()
    assert victim.read_text() == "keep me"
