"""The health monitor thread against the simulated NVML, through the real adapter."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from plugin.daemon.health_monitor import HealthMonitor
from sharing.config import load_config
from sharing.health import HealthSettings, XidPolicy
from sharing.nvml import NODES_DIR, Nvml, read_inventory
from sharing.nvml.sim import inject_xid, lose_gpu, reset_gpu
from sharing.plan import build_plan

DEADLINE_S = 5.0
TIME_SLICING_X4 = """
version: v1
flags: {migStrategy: mixed}
sharing:
  timeSlicing:
    resources:
      - {name: nvidia.com/gpu, replicas: 4}
"""


class Published:
    """Collects every overlay the monitor publishes; waits on a condition, never sleeps."""

    def __init__(self) -> None:
        self.overlays: list[dict[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, overlay: Mapping[str, str]) -> None:
        with self._cond:
            self.overlays.append(dict(overlay))
            self._cond.notify_all()

    @property
    def latest(self) -> dict[str, str]:
        """The last overlay published (empty before the first)."""
        with self._cond:
            return self.overlays[-1] if self.overlays else {}

    def wait_for(self, pred: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        """The first published overlay (from now on or the latest) that satisfies `pred`."""
        with self._cond:
            ok = self._cond.wait_for(lambda: bool(self.overlays) and pred(self.overlays[-1]),
                                     timeout=DEADLINE_S)
            assert ok, f"no overlay satisfied the condition; last: {self.latest}"
            return self.overlays[-1]


Start = Callable[..., tuple[HealthMonitor, Published, Nvml, Path]]


@pytest.fixture
def monitor(sim_nvml: Callable[..., tuple[Nvml, Path]]) -> Iterator[Start]:
    """Factory: a started monitor over a fresh simulated node; stopped after the test."""
    started: list[HealthMonitor] = []

    def start(node: str | Path = "dgx-a100", *, quiet_s: float = 300.0, probe_s: float = 10.0,
              disabled: str | None = None, reset_probe_s: float = 1.0,
              ) -> tuple[HealthMonitor, Published, Nvml, Path]:
        nvml, state = sim_nvml(node)
        inventory = read_inventory(nvml)
        settings = HealthSettings(recovery_quiet_period_s=quiet_s, probe_interval_s=probe_s)
        published = Published()
        mon = HealthMonitor(
            nvml=nvml, policy=XidPolicy.from_lists(disabled, None, settings), settings=settings,
            plan=build_plan(inventory, load_config(TIME_SLICING_X4)), inventory=inventory,
            publish=published, reset_probe_interval_s=reset_probe_s,
        )
        mon.start()
        started.append(mon)
        published.wait_for(lambda o: True)  # the first turn publishes the initial overlay
        return mon, published, nvml, state

    yield start
    for mon in started:
        mon.stop()


def wait_until(cond: Callable[[], bool]) -> None:
    """Poll `cond` until it holds, failing after the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def uuid_of(nvml: Nvml, index: int) -> str:
    """The UUID of GPU `index`."""
    return nvml.call("nvmlDeviceGetUUID", nvml.handle(index))


def test_critical_xid_marks_the_gpu(monitor: Start) -> None:
    """XID 79 injected on GPU 3 reaches the overlay under GPU 3's UUID only."""
    _, published, nvml, state = monitor()
    inject_xid(state, 3, 79)
    overlay = published.wait_for(lambda o: bool(o))
    assert overlay == {uuid_of(nvml, 3): "XID 79 (GPU has fallen off the bus), reset required"}


def test_ignored_xid_changes_nothing(monitor: Start) -> None:
    """An ignored XID is dropped; a later critical XID on another GPU shows events were read."""
    mon, published, nvml, state = monitor()
    inject_xid(state, 2, 43)
    inject_xid(state, 5, 94)
    assert set(published.wait_for(lambda o: bool(o))) == {uuid_of(nvml, 5)}
    assert mon.stats().events == 2


def test_recoverable_xid_recovers_after_quiet_period(monitor: Start) -> None:
    """XID 94 marks the GPU, and the GPU is healthy again once the quiet period has passed."""
    mon, published, nvml, state = monitor(quiet_s=0.3)
    t0 = time.monotonic()
    inject_xid(state, 1, 94)
    published.wait_for(lambda o: uuid_of(nvml, 1) in o)
    published.wait_for(lambda o: not o)
    assert time.monotonic() - t0 >= 0.3
    assert [bool(o) for o in published.overlays] == [False, True, False]


def test_reset_class_xid_waits_for_reset(monitor: Start) -> None:
    """A lost GPU (XID 79) stays Unhealthy through quiet periods and probes; a reset ends it."""
    mon, published, nvml, state = monitor(quiet_s=0.05, probe_s=0.05)
    gpu = uuid_of(nvml, 6)
    lose_gpu(state, 6)
    overlay = published.wait_for(lambda o: "GPU lost" in o.get(gpu, "") and "XID 79" in o[gpu])
    assert list(overlay) == [gpu]
    probes = mon.stats().probes
    wait_until(lambda: mon.stats().probes >= probes + 16)  # two probe rounds over 8 GPUs
    assert published.latest == overlay
    reset_gpu(state, 6)
    published.wait_for(lambda o: not o)


def test_lost_gpu_is_seen_at_once_and_its_reset_by_the_reset_probe(monitor: Start) -> None:
    """With the default 10 s probe: XID 79 triggers a probe, and a lost GPU is re-probed often."""
    _, published, nvml, state = monitor()
    gpu = uuid_of(nvml, 2)
    lose_gpu(state, 2)
    published.wait_for(lambda o: "GPU lost" in o.get(gpu, ""))
    reset_at = time.monotonic()
    reset_gpu(state, 2)
    published.wait_for(lambda o: not o)
    assert time.monotonic() - reset_at < 5.0  # the 1 s reset probe, not the 10 s probe


def test_gpu_lost_without_event_is_caught_by_probe(monitor: Start) -> None:
    """A GPU that falls off the bus without any event is marked by the scheduled probe."""
    _, published, nvml, state = monitor(probe_s=0.05)
    lose_gpu(state, 4, xid=None)
    overlay = published.wait_for(lambda o: bool(o))
    assert list(overlay) == [uuid_of(nvml, 4)]
    assert overlay[uuid_of(nvml, 4)].startswith("GPU lost")


def test_mig_scoped_xid_marks_one_mig_device(monitor: Start) -> None:
    """An XID carrying GI/CI IDs is recorded under that MIG device's UUID."""
    _, published, nvml, state = monitor("mixed")
    inventory = read_inventory(nvml)
    target = inventory.gpu(0).mig_devices[1]
    inject_xid(state, 0, 94, gi=target.gi_id, ci=target.ci_id)
    assert set(published.wait_for(lambda o: bool(o))) == {target.uuid}


def test_mps_down_and_up(monitor: Start) -> None:
    """MPS reports from another thread reach the overlay and leave it again."""
    mon, published, _, _ = monitor()
    mon.mps_down("nvidia.com/gpu", "control daemon exited")
    published.wait_for(lambda o: "mps:nvidia.com/gpu" in o)
    mon.mps_up("nvidia.com/gpu")
    published.wait_for(lambda o: not o)


def test_disabled_health_checks_publish_nothing_but_the_start(monitor: Start) -> None:
    """With DP_DISABLE_HEALTHCHECKS=all, XIDs and lost GPUs change nothing."""
    mon, published, _, state = monitor(probe_s=0.05, disabled="all")
    lose_gpu(state, 4)
    probes = mon.stats().probes
    wait_until(lambda: mon.stats().probes >= probes + 16)  # GPU 4 probed (lost) at least once
    assert published.latest == {}
    mon.mps_down("nvidia.com/gpu", "marker")  # MPS health is not an XID check: still reported
    overlay = published.wait_for(lambda o: bool(o))
    assert overlay == {"mps:nvidia.com/gpu": "MPS daemon down: marker"}


def test_stop_is_prompt(monitor: Start) -> None:
    """stop() returns within a few event-wait timeouts."""
    mon, _, _, _ = monitor()
    t0 = time.monotonic()
    mon.stop()
    assert time.monotonic() - t0 < 5.0  # 50 ms event waits, not the 10 s probe interval
    mon.stop()  # safe twice


def test_update_follows_a_new_inventory(monitor: Start) -> None:
    """After update(), a GPU that the new inventory reports lost is marked at once."""
    mon, published, nvml, state = monitor()
    lose_gpu(state, 7, xid=None)
    inventory = read_inventory(nvml)
    assert inventory.gpu(7).lost
    mon.update(build_plan(inventory, load_config(TIME_SLICING_X4)), inventory)
    assert set(published.wait_for(lambda o: bool(o))) == {inventory.gpu(7).uuid}


@pytest.mark.parametrize("code", [48, 95, 79])
def test_reset_class_xid_on_an_answering_gpu_clears_after_reset(monitor: Start, code: int) -> None:
    """XID 48/95/79 on a GPU that keeps answering: Unhealthy until the simulator resets it."""
    mon, published, nvml, state = monitor(quiet_s=0.05, probe_s=10.0, reset_probe_s=0.05)
    gpu = uuid_of(nvml, 2)
    inject_xid(state, 2, code)
    overlay = published.wait_for(lambda o: gpu in o)
    probes = mon.stats().probes
    wait_until(lambda: mon.stats().probes >= probes + 4)  # GPU 2 alone, every 50 ms
    assert published.latest == overlay
    reset_gpu(state, 2)
    published.wait_for(lambda o: not o)


def test_reset_is_seen_by_the_reset_probe_by_default(monitor: Start) -> None:
    """With the default 10 s probe and 1 s reset probe, the reset clears XID 48 within 5 s
    (before the next 10 s probe)."""
    _, published, nvml, state = monitor()
    inject_xid(state, 2, 48)
    published.wait_for(lambda o: uuid_of(nvml, 2) in o)
    reset_at = time.monotonic()
    reset_gpu(state, 2)
    published.wait_for(lambda o: not o)
    assert time.monotonic() - reset_at < 5.0  # the 1 s reset probe, not the 10 s probe


def test_driver_without_the_field_keeps_the_gpu_unhealthy_after_reset(
    monitor: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the recovery action field only rule (a) applies: a reset NVML cannot see changes
    nothing, and the monitor says once why."""
    node = tmp_path / "old-driver.yaml"
    node.write_text((NODES_DIR / "dgx-a100.yaml").read_text() + "recovery_action_field: false\n")
    caplog.set_level(logging.INFO, logger="gpushare.health")
    mon, published, nvml, state = monitor(node, quiet_s=0.05, reset_probe_s=0.05)
    inject_xid(state, 2, 48)
    overlay = published.wait_for(lambda o: uuid_of(nvml, 2) in o)
    reset_gpu(state, 2)
    probes = mon.stats().probes
    wait_until(lambda: mon.stats().probes >= probes + 6)
    assert published.latest == overlay
    notes = [r.getMessage() for r in caplog.records if "does not report" in r.getMessage()]
    assert len(notes) == 1
    assert notes[0].startswith(f"gpu 2 ({uuid_of(nvml, 2)}): the driver does not report")


def test_reset_transition_is_logged_once(monitor: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpushare.health")
    _, published, nvml, state = monitor(reset_probe_s=0.05)
    gpu = uuid_of(nvml, 2)
    inject_xid(state, 2, 95)
    published.wait_for(lambda o: gpu in o)
    reset_gpu(state, 2)
    published.wait_for(lambda o: not o)
    healthy = [r.getMessage() for r in caplog.records if "healthy again" in r.getMessage()]
    assert healthy == [
        f"gpu 2 ({gpu}) healthy again: XID 95 (uncontained ECC error), reset required cleared: "
        "the GPU was reset (recovery action none); 4 virtual devices affected"
    ]
