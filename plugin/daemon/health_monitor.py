"""The health monitor thread: NVML events and scheduled probes in, health overlay out.

One plain loop on one thread. Each turn it waits on the NVML event watcher with a short timeout
(so `stop()` is prompt), drains every event already queued, applies the whole batch to the
HealthTracker (sharing.health), probes GPUs when their probe is due, and publishes the overlay
once if it changed. A storm of events therefore costs one overlay publish per batch, not one per
event. Every transition is logged once, with the XID, the reason and the affected device count.

A GPU that stopped answering, or that has a reset-class fault, is probed every
`reset_probe_interval_s` (1 s), so a reset shows promptly. A probe of an answering GPU with a
reset-class fault also reads the driver's recovery action: a pending reset followed by `none`
clears the fault (sharing.health, rule b).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sharing.devices import Inventory
from sharing.errors import GpuLost, NvmlError
from sharing.health import (
    ENV_DISABLE,
    ENV_ENABLE,
    HealthSection,
    HealthSettings,
    HealthTracker,
    HealthTransition,
    XidEventLike,
    XidPolicy,
)
from sharing.plan_types import Plan

log = logging.getLogger("gpushare.health")

DEFAULT_WAIT_TIMEOUT_MS = 50
MAX_BATCH = 1000  # events applied per turn before the overlay is published
WATCHER_RETRY_S = 1.0
RESET_PROBE_INTERVAL_S = 1.0  # an unanswering GPU or one awaiting a reset is probed this often


class EventWatcher(Protocol):
    """An NVML event set registered on some GPUs (sharing.nvml's EventWatcher)."""

    def wait(self, timeout_ms: int) -> XidEventLike | None:
        """The next event, or None when none arrived within the timeout."""

    def close(self) -> None:
        """Free the event set."""


class HealthNvml(Protocol):
    """What the monitor needs from the NVML adapter (sharing.nvml.Nvml)."""

    def event_watcher(self, gpu_indices: Sequence[int]) -> EventWatcher:
        """Register critical XID and ECC events on these GPUs."""

    def probe(self, gpu_index: int) -> None:
        """Ask the GPU something cheap; raises GpuLost (or NvmlError) when it does not answer."""

    def recovery_action(self, gpu_index: int) -> str | None:
        """The driver's recovery action (`none`, `gpu_reset`, ...); None when not reported."""


Publish = Callable[[Mapping[str, str]], None]
OnXid = Callable[[int, int], None]  # (GPU index, XID) of each XID event received


@dataclass(frozen=True)
class MonitorStats:
    """Counters of one monitor's work since it started."""

    events: int
    batches: int
    publishes: int
    probes: int
    transitions: int


class HealthMonitor:
    """Owns a HealthTracker on its own thread; others talk to it through thread-safe calls."""

    def __init__(
        self,
        *,
        nvml: HealthNvml,
        policy: XidPolicy,
        settings: HealthSettings,
        plan: Plan,
        inventory: Inventory,
        publish: Publish,
        clock: Callable[[], float] = time.monotonic,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        reset_probe_interval_s: float = RESET_PROBE_INTERVAL_S,
        on_xid: OnXid | None = None,
    ) -> None:
        self._nvml = nvml
        self._on_xid = on_xid
        self._reset_probe_s = reset_probe_interval_s
        self._publish = publish
        self._clock = clock
        self._wait_ms = wait_timeout_ms
        self._probe_interval_s = settings.probe_interval_s
        self._tracker = HealthTracker(policy, settings.recovery_quiet_period_s, plan, inventory)
        self._commands: queue.SimpleQueue[Callable[[], list[HealthTransition]]] = (
            queue.SimpleQueue()
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher: EventWatcher | None = None
        self._watched: tuple[int, ...] | None = None
        self._watcher_retry_at = 0.0
        self._next_probe_at = 0.0
        self._next_reset_probe_at = 0.0
        self._candidate_probed_at: dict[str, float] = {}
        self._no_recovery_field: set[str] = set()
        self._published_version = -1
        self._counts = {"events": 0, "batches": 0, "publishes": 0, "probes": 0, "transitions": 0}

    # -- control (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        """Register NVML events and publish the initial overlay now, then start the thread.

        Events are registered before this returns, so no fault after start() is missed.
        """
        if self._thread is not None:
            return
        self._emit(self._adopt(self._tracker.plan, self._tracker.inventory))
        self._current_watcher()
        self._thread = threading.Thread(target=self._run, name="gpushare-health", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and free the event set; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def update(self, plan: Plan, inventory: Inventory) -> None:
        """Follow a new Plan and Inventory (after a reload or a MIG change)."""
        self._commands.put(lambda: self._adopt(plan, inventory))

    def configure(self, policy: XidPolicy, settings: HealthSettings) -> None:
        """Apply a new policy and timing (after a reload); faults already recorded stay."""
        self._commands.put(lambda: self._reconfigure(policy, settings))

    def mps_down(self, resource: str, reason: str) -> None:
        """Report the MPS daemon of `resource` down: all its devices become Unhealthy."""
        self._commands.put(lambda: self._tracker.on_mps_down(resource, reason, self._clock()))

    def mps_up(self, resource: str) -> None:
        """Report the MPS daemon of `resource` answering again."""
        self._commands.put(lambda: self._tracker.on_mps_up(resource))

    @property
    def alive(self) -> bool:
        """True while the monitor thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> MonitorStats:
        """A copy of the work counters."""
        return MonitorStats(**self._counts)

    # -- the loop (monitor thread) -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        finally:
            self._close_watcher()

    def _turn(self) -> None:
        out: list[HealthTransition] = []
        while not self._commands.empty():
            out += self._commands.get_nowait()()
        batch = self._wait_batch()
        now = self._clock()
        if batch:
            self._count_xids(batch)
            self._counts["events"] += len(batch)
            self._counts["batches"] += 1
            out += self._probe_faulted(self._tracker.on_events(batch, now), now)
        if now >= self._next_probe_at:
            out += self._probe_all(now)
        elif now >= self._next_reset_probe_at:
            out += self._probe_awaiting_reset(now)
        out += self._recover(now)
        self._emit(out)

    def _count_xids(self, batch: list[XidEventLike]) -> None:
        if self._on_xid is None:
            return
        for event in batch:
            if event.event_type == "xid":
                self._on_xid(event.gpu_index, event.xid)

    def _reconfigure(self, policy: XidPolicy, settings: HealthSettings) -> list[HealthTransition]:
        tracker = self._tracker
        old = (tracker.policy, tracker.quiet_period_s, self._probe_interval_s)
        new = (policy, settings.recovery_quiet_period_s, settings.probe_interval_s)
        if old != new:
            log.info("health settings changed: %s", settings)
            tracker.policy, tracker.quiet_period_s, self._probe_interval_s = new
            self._next_probe_at = min(self._next_probe_at, self._clock() + self._probe_interval_s)
        return []

    def _adopt(self, plan: Plan, inventory: Inventory) -> list[HealthTransition]:
        """Take a new plan; GPUs the inventory reports lost count as failed probes."""
        out = self._tracker.set_plan(plan, inventory)
        now = self._clock()
        for gpu in inventory.gpus:
            if gpu.lost:
                out += self._tracker.on_probe(gpu.uuid, False, now, gpu.lost_reason)
        self._next_probe_at = now  # probe everything on the next turn
        return out

    def _wait_batch(self) -> list[XidEventLike]:
        """Wait for one event (short timeout), then drain what is already queued."""
        watcher = self._current_watcher()
        if watcher is None:
            self._stop.wait(self._wait_ms / 1000)
            return []
        batch: list[XidEventLike] = []
        try:
            event = watcher.wait(self._wait_ms)
            while event is not None:
                batch.append(event)
                if len(batch) >= MAX_BATCH:
                    break
                event = watcher.wait(0)
        except GpuLost as err:
            log.warning("NVML event wait: a GPU is lost (%s); probing every GPU now", err)
            self._next_probe_at = 0.0
        except NvmlError as err:
            log.error("NVML event wait failed: %s; re-registering events", err)
            self._close_watcher()
        return batch

    def _current_watcher(self) -> EventWatcher | None:
        """The event watcher for the GPUs that answer now, (re)created when that set changes."""
        tracker = self._tracker
        wanted = tuple(
            g.index
            for g in tracker.inventory.gpus
            if not g.lost and not tracker.gpu_unanswering(g.uuid)
        )
        if self._watcher is not None and wanted == self._watched:
            return self._watcher
        now = self._clock()
        if self._watcher is None and wanted == self._watched and now < self._watcher_retry_at:
            return None
        self._close_watcher()
        self._watched = wanted
        if not wanted:
            return None
        try:
            self._watcher = self._nvml.event_watcher(wanted)
        except NvmlError as err:
            log.error("cannot register NVML events on GPUs %s: %s", list(wanted), err)
            self._watcher_retry_at = now + WATCHER_RETRY_S
        return self._watcher

    def _close_watcher(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            try:
                watcher.close()
            except NvmlError as err:
                log.debug("closing the NVML event set: %s", err)

    def _probe(self, uuid: str, index: int, now: float) -> list[HealthTransition]:
        """Probe one GPU; one that answers and awaits a reset also has its recovery action read."""
        self._counts["probes"] += 1
        try:
            self._nvml.probe(index)
        except NvmlError as err:
            return self._tracker.on_probe(uuid, False, now, str(err))
        out = self._tracker.on_probe(uuid, True, now)
        if self._tracker.awaiting_reset(uuid):
            out += self._read_recovery_action(uuid, index, now)
        return out

    def _read_recovery_action(self, uuid: str, index: int, now: float) -> list[HealthTransition]:
        try:
            action = self._nvml.recovery_action(index)
        except GpuLost as err:
            return self._tracker.on_probe(uuid, False, now, str(err))
        except NvmlError as err:
            log.debug("reading the recovery action of gpu %d: %s", index, err)
            return []
        if action is None and uuid not in self._no_recovery_field:
            self._no_recovery_field.add(uuid)
            log.info(
                "gpu %d (%s): the driver does not report the GPU recovery action; a reset is "
                "seen only when the GPU stops answering and answers again", index, uuid,
            )
        return self._tracker.on_recovery_action(uuid, action, now)

    def _probe_all(self, now: float) -> list[HealthTransition]:
        """The scheduled probe of every GPU: catches a GPU that fell off without an event."""
        self._next_probe_at = now + self._probe_interval_s
        self._next_reset_probe_at = now + min(self._reset_probe_s, self._probe_interval_s)
        out: list[HealthTransition] = []
        for gpu in self._tracker.inventory.gpus:
            out += self._probe(gpu.uuid, gpu.index, now)
        return out

    def _probe_faulted(
        self, transitions: list[HealthTransition], now: float
    ) -> list[HealthTransition]:
        """Probe each GPU an event just marked: a GPU that fell off the bus shows as lost now."""
        out = list(transitions)
        for uuid in dict.fromkeys(t.gpu_uuid for t in transitions if not t.healthy):
            gpu = self._tracker.inventory.gpu_by_uuid(uuid)
            if gpu is not None and not self._tracker.gpu_unanswering(uuid):
                out += self._probe(uuid, gpu.index, now)
        return out

    def _probe_awaiting_reset(self, now: float) -> list[HealthTransition]:
        """Probe GPUs that stopped answering or await a reset more often: a reset shows promptly."""
        self._next_reset_probe_at = now + min(self._reset_probe_s, self._probe_interval_s)
        tracker = self._tracker
        out: list[HealthTransition] = []
        for gpu in tracker.inventory.gpus:
            if tracker.gpu_unanswering(gpu.uuid) or tracker.awaiting_reset(gpu.uuid):
                out += self._probe(gpu.uuid, gpu.index, now)
        return out

    def _recover(self, now: float) -> list[HealthTransition]:
        """Probe GPUs whose quiet period ended (once per probe interval each), then tick."""
        out: list[HealthTransition] = []
        for uuid in self._tracker.recovery_candidates(now):
            gpu = self._tracker.inventory.gpu_by_uuid(uuid)
            last = self._candidate_probed_at.get(uuid)
            if gpu is None or (last is not None and now - last < self._probe_interval_s):
                continue
            self._candidate_probed_at[uuid] = now
            out += self._probe(uuid, gpu.index, now)
        out += self._tracker.tick(now)
        return out

    def _emit(self, transitions: list[HealthTransition]) -> None:
        """Log each transition once and publish the overlay if it changed."""
        for tr in transitions:
            level = logging.INFO if tr.healthy else logging.WARNING
            log.log(level, "%s", tr.message, extra=_log_fields(tr))
            if tr.healthy:
                self._candidate_probed_at.pop(tr.gpu_uuid, None)
        self._counts["transitions"] += len(transitions)
        if self._tracker.version == self._published_version:
            return
        self._published_version = self._tracker.version
        self._counts["publishes"] += 1
        try:
            self._publish(self._tracker.overlay())
        except Exception:  # a failing consumer must not stop health monitoring
            log.exception("publishing the health overlay failed")


def _log_fields(tr: HealthTransition) -> dict[str, object]:
    """Structured fields of a transition's log line: GPU, MIG device or resource, XID, count."""
    fields: dict[str, object] = {"xid": tr.xid, "affected": tr.affected}
    if tr.key.startswith("mps:"):
        fields["resource"] = tr.key[4:]
        return fields
    fields["gpu"] = tr.gpu_index
    if tr.key != tr.gpu_uuid:
        fields["device"] = tr.key
    return fields


def health_policy(
    env: Mapping[str, str], health: HealthSection
) -> tuple[XidPolicy, HealthSettings]:
    """Policy and settings from the `health:` section and DP_*_HEALTHCHECKS in `env`.

    Raises:
        ConfigError: DP_DISABLE_HEALTHCHECKS or DP_ENABLE_HEALTHCHECKS holds a bad value.
    """
    settings = HealthSettings.of(health)
    return XidPolicy.from_lists(env.get(ENV_DISABLE), env.get(ENV_ENABLE), settings), settings


def create_health_monitor(
    *,
    nvml: HealthNvml,
    env: Mapping[str, str],
    health: HealthSection,
    plan: Plan,
    inventory: Inventory,
    publish: Publish,
    on_xid: OnXid | None = None,
) -> HealthMonitor:
    """The monitor for a daemon: policy from the `health:` section and DP_*_HEALTHCHECKS.

    Raises:
        ConfigError: DP_DISABLE_HEALTHCHECKS or DP_ENABLE_HEALTHCHECKS holds a bad value.
    """
    policy, settings = health_policy(env, health)
    if policy.disabled:
        log.warning("health checks disabled: XIDs and lost GPUs will not mark devices Unhealthy")
    return HealthMonitor(
        nvml=nvml, policy=policy, settings=settings, plan=plan, inventory=inventory,
        publish=publish, on_xid=on_xid,
    )
