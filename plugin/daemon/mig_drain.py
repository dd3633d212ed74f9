"""Draining the GPUs a MIG reconfiguration job changes, before anything is touched.

The served devices on those GPUs go Unhealthy at the kubelet (a health overlay source of their
physical IDs, so new pods stop landing there and the MIG devices the job creates are Healthy as
soon as the new Plan serves them); gpushare's own MPS daemons there stop (their MPS servers are
compute processes, facts §4); then the drain waits until no compute process runs on the GPUs or
their MIG devices. Past the drain timeout it fails, or with killProcesses terminates the
processes (SIGTERM, then SIGKILL after a grace period) and waits for them to go. `undo` puts
devices and MPS daemons back as they were.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from plugin.daemon.mps_wiring import without_held
from sharing.devices import Inventory
from sharing.errors import SharingError
from sharing.health import mps_key
from sharing.nvml import Nvml, read_inventory
from sharing.plan_types import Plan

OVERLAY_SOURCE = "mig-job"
STALE_SOURCE = "mig-stale"  # devices a job destroyed that no Plan could replace yet
MPS_SOURCE = "mig-job-mps"  # MPS resources whose daemons a job stopped, until they run again
MPS_RESTART_WAIT_S = 30.0
DRAIN_POLL_S = 0.1
KILL_GRACE_S = 10.0  # after a signal, how long processes get to vanish

ProcessKiller = Callable[[int, int, bool], None]  # (gpu index, pid, force: SIGKILL)
Busy = dict[int, tuple[int, ...]]  # GPU index -> compute pids


class DrainCancelled(Exception):
    """The daemon is stopping: the drain ends and the job fails with nothing touched."""


class Drain:
    """The drain of one job's GPUs; `host` is the daemon (overlay, Plan, MPS supervisor)."""

    def __init__(
        self,
        host: Any,
        gpus: Mapping[str, int],
        *,
        reason: str,
        progress: Callable[[str], None],
        kill: ProcessKiller | None,
        stopping: threading.Event,
        poll_s: float = DRAIN_POLL_S,
        kill_grace_s: float = KILL_GRACE_S,
    ) -> None:
        self.host = host
        self.gpus = dict(gpus)  # GPU UUID -> index
        self.reason = reason
        self._progress = progress
        self._kill = kill
        self._stopping = stopping
        self._poll_s = poll_s
        self._kill_grace_s = kill_grace_s
        self._served: dict[str, str] = {}  # overlay of the devices served before the job
        self._before: Plan | None = None  # the Plan served when the drain began
        self._stopped: frozenset[str] = frozenset()  # MPS resources whose daemons it stopped

    def begin(self) -> None:
        """Mark the GPUs Unhealthy and stop our MPS daemons on them (every device of such an
        MPS resource is Unhealthy while its daemon is down).

        The overlay names the GPUs themselves as well as their served devices, so an instance
        the job has made is Unhealthy too if a reload (config edit, SIGHUP) serves the GPU
        half-way; the MPS daemons stay held (`host.mps_held`) across such reloads."""
        plan: Plan = self.host.plan
        self._before = plan
        keys = overlay_keys(plan, set(self.gpus))
        stopped = frozenset(r.name for r in plan.resources
                            if r.mps and set(self.gpus) & set(r.mps.gpu_uuids))
        served = {k: self.reason for k in keys}
        self._served, self._stopped = served, stopped
        self.host.mps_held = frozenset(self.gpus)
        self.host.set_health_overlay(
            {mps_key(name): f"{self.reason}: MPS daemon stopped" for name in stopped},
            source=MPS_SOURCE)
        overlay = {**{uuid: self.reason for uuid in self.gpus}, **served}
        self.host.set_health_overlay(overlay, source=OVERLAY_SOURCE)
        self._progress(f"{len(keys)} physical devices Unhealthy at the kubelet")
        supervisor = self.host.mps_supervisor
        if supervisor is not None and stopped:
            supervisor.update(without_held(plan, self.host.mps_held))
            self._progress(f"stopped the MPS daemons of {', '.join(sorted(stopped))}")

    def wait(self, nvml: Nvml, timeout_s: float, kill_processes: bool) -> None:
        """Wait until the GPUs run no compute process.

        Raises:
            TimeoutError: processes remain past `timeout_s` (and, when killing, its graces).
            DrainCancelled: the daemon is stopping.
            SharingError: NVML failed reading the GPUs (e.g. one was lost).
        """
        deadline = time.monotonic() + timeout_s
        signals = 0  # 1: SIGTERM sent, 2: SIGKILL sent
        reported: Busy = {}
        while True:
            busy = processes(read_inventory(nvml), self.gpus.values())
            if not busy:
                return
            if busy != reported:
                reported = busy
                self._progress("waiting for processes: " + describe(busy))
            if time.monotonic() >= deadline:
                if not kill_processes or signals == 2 or self._kill is None:
                    what = "after killing them" if signals else f"after {timeout_s:g} s"
                    raise TimeoutError(f"processes still running {what}: {describe(busy)}")
                signals += 1
                self._signal(busy, force=signals == 2)
                deadline = time.monotonic() + self._kill_grace_s
            if self._stopping.wait(self._poll_s):
                raise DrainCancelled("the daemon is stopping")

    def applied(self) -> None:
        """The layout is in place (or the apply gave up): the GPUs' devices may be served as
        they now are and the MPS daemons may start with the next Plan; the devices served
        before the job stay Unhealthy until that Plan replaces them."""
        self.host.mps_held = frozenset()
        self.host.set_health_overlay(self._served, source=OVERLAY_SOURCE)

    def stale(self, gpu_uuids: set[str], reason: str) -> None:
        """No new Plan could be served after these GPUs changed: their old devices, which no
        longer exist, stay Unhealthy (source STALE_SOURCE, dropped by the next Plan served)."""
        keys = overlay_keys(self._before, gpu_uuids) if self._before is not None else set()
        self.host.set_health_overlay({k: reason for k in keys}, source=STALE_SOURCE)

    def undo(self) -> None:
        """Devices Healthy again and the MPS daemons back, as before the drain."""
        self.end()

    def end(self) -> None:
        """Drop the drain's Unhealthy marks and MPS hold (after the new Plan is served); the
        MPS resources it stopped stay Unhealthy until their daemons run again (or fail to
        start, which the supervisor reports itself), at most MPS_RESTART_WAIT_S."""
        self.host.mps_held = frozenset()
        self.host.set_health_overlay({}, source=OVERLAY_SOURCE)
        supervisor = self.host.mps_supervisor
        if supervisor is not None:
            supervisor.update(self.host.plan)
            served = {r.name for r in self.host.plan.resources if r.mps}
            waiting = self._stopped & served
            deadline = time.monotonic() + MPS_RESTART_WAIT_S
            while (waiting and not self._stopping.is_set() and time.monotonic() < deadline
                   and any(supervisor.healthy().get(name) is None for name in waiting)):
                self._stopping.wait(self._poll_s)
        self.host.set_health_overlay({}, source=MPS_SOURCE)

    def _signal(self, busy: Busy, force: bool) -> None:
        assert self._kill is not None
        how = "killing" if force else "terminating"
        self._progress(f"drain timeout: {how} " + describe(busy))
        for index, pids in busy.items():
            for pid in pids:
                try:
                    self._kill(index, pid, force)
                except (OSError, SharingError) as err:
                    self._progress(f"{how} process {pid} on GPU {index} failed: {err}")


def overlay_keys(plan: Plan, gpu_uuids: set[str]) -> set[str]:
    """Physical IDs of every served device on these GPUs (full GPUs, MIG devices, replicas)."""
    return {d.physical_id for r in plan.resources for d in r.devices if d.gpu_uuid in gpu_uuids}


def processes(inventory: Inventory, indices: Iterable[int]) -> Busy:
    """GPU index -> compute pids on it or its MIG devices, for the GPUs that have some."""
    busy = {}
    wanted = set(indices)
    for gpu in inventory.gpus:
        if gpu.index not in wanted:
            continue
        pids = set(gpu.processes).union(*(m.processes for m in gpu.mig_devices))
        if pids:
            busy[gpu.index] = tuple(sorted(pids))
    return busy


def describe(busy: Busy) -> str:
    """`GPU 0: pid 123; GPU 3: pids 7, 9`, at most 8 pids per GPU."""
    return "; ".join(
        f"GPU {i}: pid{'s' if len(p) > 1 else ''} {', '.join(map(str, p[:8]))}"
        + (f" and {len(p) - 8} more" if len(p) > 8 else "")
        for i, p in sorted(busy.items())
    )


__all__ = ["MPS_SOURCE", "OVERLAY_SOURCE", "STALE_SOURCE", "Drain", "DrainCancelled",
           "ProcessKiller", "describe", "overlay_keys", "processes"]
