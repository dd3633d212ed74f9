"""Health end to end: simulated NVML faults -> daemon -> ListAndWatch -> the kubelet stand-in."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.daemon.core import Daemon
from plugin.daemon.health_monitor import HealthMonitor
from sharing.errors import ConfigError
from sharing.nvml import load_library
from sharing.nvml.sim import create_state, inject_xid, inject_xids, lose_gpu, reset_gpu
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir

GPU = "nvidia.com/gpu"
HEALTH = """
health:
  recoveryQuietPeriod: 300ms
  probeInterval: 50ms
"""
TIME_SLICING_X4 = """
version: v1
sharing:
  timeSlicing:
    resources:
      - {name: nvidia.com/gpu, replicas: 4}
""" + HEALTH
MIG_SHARED = """
version: v1
flags: {migStrategy: mixed}
sharing:
  timeSlicing:
    resources:
      - {name: nvidia.com/mig-1g.10gb, replicas: 4}
      - {name: nvidia.com/mig-3g.40gb, replicas: 2}
""" + HEALTH

Start = Callable[..., tuple[Daemon, Path]]


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    """The kubelet stand-in on a short temporary kubelet directory."""
    with short_dir() as path:
        fake = FakeKubelet(path)
        yield fake
        fake.stop()


@pytest.fixture
def start(tmp_path: Path, kubelet: FakeKubelet) -> Iterator[Start]:
    """Start a daemon on a fresh simulated node; returns it and the node's state directory."""
    daemons: list[Daemon] = []

    def run(node: str = "dgx-a100", config: str = TIME_SLICING_X4,
            env: dict[str, str] | None = None) -> tuple[Daemon, Path]:
        state = create_state(node, tmp_path / f"node-{len(daemons)}")
        path = tmp_path / "config.yaml"
        path.write_text(config)
        daemon = Daemon(config_path=path, kubelet_dir=kubelet.kubelet_dir,
                        nvml_lib=load_library(str(state)), env=env or {}, overrides={})
        daemons.append(daemon)
        daemon.start()
        for name in daemon.plan.names:
            kubelet.wait_for_list(name, lambda d: all(x.healthy for x in d.devices))
        return daemon, state

    yield run
    for daemon in daemons:
        daemon.stop()


def unhealthy(kubelet: FakeKubelet, daemon: Daemon) -> dict[str, set[str]]:
    """Resource -> Unhealthy device IDs in the stand-in's latest lists."""
    found = {}
    for name in daemon.plan.names:
        latest = kubelet.latest(name)
        assert latest is not None
        if latest.unhealthy_ids:
            found[name] = set(latest.unhealthy_ids)
    return found


def replicas_of(daemon: Daemon, parent: str) -> dict[str, set[str]]:
    """Resource -> IDs of the virtual devices on a GPU or MIG device, over the whole plan."""
    found = {}
    for res in daemon.plan.resources:
        ids = {d.id for d in res.devices if parent in (d.physical_id, d.gpu_uuid)}
        if ids:
            found[res.name] = ids
    return found


def monitor_of(daemon: Daemon) -> HealthMonitor:
    """The daemon's health monitor."""
    [monitor] = [c for c in daemon.components if isinstance(c, HealthMonitor)]
    return monitor


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `cond` with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)


def test_xid_79_marks_all_four_replicas(start: Start, kubelet: FakeKubelet) -> None:
    """XID 79 on GPU 3 under time-slicing x4: its 4 replicas Unhealthy, the other 28 Healthy."""
    daemon, state = start()
    gpu3 = daemon.inventory.gpu(3).uuid
    inject_xid(state, 3, 79)
    latest = kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    assert set(latest.unhealthy_ids) == {f"{gpu3}::{n}" for n in range(4)}
    assert len(latest.healthy_ids) == 28


def test_ignored_xid_changes_nothing(start: Start, kubelet: FakeKubelet) -> None:
    """XID 43 (an application error) is ignored; XID 94 injected after it is not."""
    daemon, state = start()
    before = len(kubelet.lists(GPU))
    inject_xid(state, 2, 43)
    inject_xid(state, 5, 94)
    kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    lists = kubelet.lists(GPU)[before:]
    assert len(lists) == 1, "one new list: the ignored XID sent none"
    assert unhealthy(kubelet, daemon) == replicas_of(daemon, daemon.inventory.gpu(5).uuid)


def test_env_ignores_an_xid(start: Start, kubelet: FakeKubelet) -> None:
    """DP_DISABLE_HEALTHCHECKS=79 (upstream env): XID 79 is ignored, XID 94 still counts."""
    daemon, state = start(env={"DP_DISABLE_HEALTHCHECKS": "79"})
    inject_xid(state, 3, 79)
    inject_xid(state, 5, 94)
    kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    assert unhealthy(kubelet, daemon) == replicas_of(daemon, daemon.inventory.gpu(5).uuid)


def test_bad_env_value_refuses_to_start(start: Start) -> None:
    """A bad DP_ENABLE_HEALTHCHECKS value stops the start with the variable and value named."""
    with pytest.raises(ConfigError, match="DP_ENABLE_HEALTHCHECKS: invalid value 'seventy'"):
        start(env={"DP_ENABLE_HEALTHCHECKS": "seventy"})


def test_recoverable_xid_recovers_after_quiet_period(start: Start, kubelet: FakeKubelet) -> None:
    """XID 94: Unhealthy, then Healthy again once 300 ms passed without a critical XID."""
    daemon, state = start()
    injected = time.monotonic()
    inject_xid(state, 1, 94)
    sick = kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    assert {i.split("::")[0] for i in sick.unhealthy_ids} == {daemon.inventory.gpu(1).uuid}
    well = kubelet.wait_for_list(GPU, lambda d: not d.unhealthy_ids)
    assert well.at - injected >= 0.3


def test_lost_gpu_recovers_after_reset(start: Start, kubelet: FakeKubelet) -> None:
    """A GPU that falls off the bus stays Unhealthy past the quiet period until it is reset."""
    daemon, state = start()
    gpu6 = daemon.inventory.gpu(6).uuid
    lose_gpu(state, 6)
    kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    assert unhealthy(kubelet, daemon) == replicas_of(daemon, gpu6)
    monitor = monitor_of(daemon)
    probes = monitor.stats().probes
    wait_until(lambda: monitor.stats().probes >= probes + 8 * 8)  # 8 rounds: > quiet period
    assert unhealthy(kubelet, daemon) == replicas_of(daemon, gpu6)
    reset_gpu(state, 6)
    kubelet.wait_for_list(GPU, lambda d: not d.unhealthy_ids)


def test_double_bit_ecc_xid_recovers_after_reset(start: Start, kubelet: FakeKubelet) -> None:
    """XID 48 on GPU 2, which keeps answering: its 4 replicas stay Unhealthy past the quiet
    period, and `reset_gpu` (recovery action back to none) makes all 32 Healthy again."""
    daemon, state = start()
    gpu2 = daemon.inventory.gpu(2).uuid
    injected = time.monotonic()
    inject_xid(state, 2, 48)
    sick = kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    assert set(sick.unhealthy_ids) == {f"{gpu2}::{n}" for n in range(4)}
    monitor = monitor_of(daemon)
    probes = monitor.stats().probes
    wait_until(lambda: monitor.stats().probes >= probes + 8 * 8  # 8 probe rounds ...
               and time.monotonic() - injected > 0.3)  # ... and the 300 ms quiet period
    assert unhealthy(kubelet, daemon) == replicas_of(daemon, gpu2)
    reset_at = time.monotonic()
    reset_gpu(state, 2)
    well = kubelet.wait_for_list(GPU, lambda d: not d.unhealthy_ids)
    assert len(well.healthy_ids) == 32
    assert well.at - reset_at < 10.0


def test_edited_quiet_period_applies_on_reload(
    start: Start, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    """A 1 h quiet period holds the GPU Unhealthy; editing it to 100 ms and reloading frees it."""
    daemon, state = start(config=TIME_SLICING_X4.replace("300ms", "1h"))
    inject_xid(state, 4, 94)
    kubelet.wait_for_list(GPU, lambda d: bool(d.unhealthy_ids))
    (tmp_path / "config.yaml").write_text(TIME_SLICING_X4.replace("300ms", "100ms"))
    assert daemon.reload()
    kubelet.wait_for_list(GPU, lambda d: not d.unhealthy_ids)


def test_mig_scoped_xid_marks_one_mig_device(start: Start, kubelet: FakeKubelet) -> None:
    """An XID with GI/CI IDs marks the replicas of that MIG device only, not its siblings."""
    daemon, state = start("mixed", MIG_SHARED)
    target = [m for m in daemon.inventory.gpu(0).mig_devices if m.profile == "1g.10gb"][0]
    inject_xid(state, 0, 94, gi=target.gi_id, ci=target.ci_id)
    kubelet.wait_for_list("nvidia.com/mig-1g.10gb", lambda d: bool(d.unhealthy_ids))
    expected = replicas_of(daemon, target.uuid)
    assert expected == {"nvidia.com/mig-1g.10gb": {f"{target.uuid}::{n}" for n in range(4)}}
    assert unhealthy(kubelet, daemon) == expected


def test_lost_gpu_marks_every_device_on_it(start: Start, kubelet: FakeKubelet) -> None:
    """A lost MIG GPU: every MIG device on it and every replica, in every resource."""
    daemon, state = start("mixed", MIG_SHARED)
    gpu0 = daemon.inventory.gpu(0).uuid
    expected = replicas_of(daemon, gpu0)
    assert set(expected) == {"nvidia.com/mig-1g.10gb", "nvidia.com/mig-2g.20gb",
                             "nvidia.com/mig-3g.40gb"}
    lose_gpu(state, 0, xid=None)
    for name in expected:
        kubelet.wait_for_list(name, lambda d: bool(d.unhealthy_ids))
    assert unhealthy(kubelet, daemon) == expected


def test_xid_storm_is_coalesced(start: Start, kubelet: FakeKubelet) -> None:
    """10 000 XIDs on GPUs 0-5: Allocate keeps answering fast, and few lists are sent."""
    daemon, state = start()
    monitor = monitor_of(daemon)
    before = len(kubelet.lists(GPU))
    codes = (94, 79, 43, 74, 48, 95, 31, 63)
    allocate_s = []
    began = time.monotonic()
    for chunk in range(20):
        inject_xids(state, [(n % 6, codes[(n // 6) % len(codes)], None, None)
                            for n in range(chunk * 500, chunk * 500 + 500)])
        t0 = time.monotonic()
        answer = kubelet.allocate(GPU, 1)
        allocate_s.append(time.monotonic() - t0)
        assert answer.response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"]
        wait_until(lambda c=chunk: monitor.stats().events >= (c + 1) * 500)
    took = time.monotonic() - began
    latest = kubelet.wait_for_list(GPU, lambda d: len(d.unhealthy_ids) == 24)
    assert {i.split("::")[0] for i in latest.healthy_ids} == {
        daemon.inventory.gpu(i).uuid for i in (6, 7)}
    stats = monitor.stats()
    assert stats.events == 10_000
    assert took < 15.0, f"the storm took {took:.2f}s"  # a storm of seconds, not a backlog
    assert max(allocate_s) < 2.0, f"slowest Allocate {max(allocate_s) * 1000:.0f} ms"
    assert len(kubelet.lists(GPU)) - before < 50
    assert stats.publishes < 50
