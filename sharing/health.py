"""The health state machine: faults in, the health overlay out, and when faults clear. Pure.

Time is passed in. The overlay (physical ID -> reason) and how it reaches virtual devices live in
sharing.health_overlay, the XID policy (ignored and reset-class XIDs, DP_*_HEALTHCHECKS, the
`health:` settings) in sharing.health_policy; both are re-exported here.

Recovery is modelled, not left to a restart:
- A recoverable XID (neither ignored nor reset-class) clears once the quiet period has passed
  since the last critical XID on that device and the GPU answered an NVML probe after that XID.
- A reset-class XID (default 48, 79, 95) clears only when the GPU is seen again after a reset,
  by either of two signals:
  (a) the GPU stopped answering NVML (a reset takes it off the bus for a moment) and then answered
      again; or the caller reports a reset it observed directly (`on_gpu_reset`);
  (b) the driver's GPU recovery action (NVML field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION): after
      the fault a probe read a pending reset (`gpu_reset` or `drain_and_reset`), and a later
      probe of the answering GPU reads `none`, so the reset happened (`gpushare sim reset` does
      this to a simulated GPU). A driver that does not report the field leaves only (a).
- A lost GPU (probe answered GPU_IS_LOST or the inventory marks it lost) is healthy again as
  soon as it answers a probe, which also counts as being seen after a reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from sharing.devices import Inventory
from sharing.health_overlay import (
    HealthTransition,
    affected_devices,
    mps_key,
    route_event,
    unhealthy_devices,
    unhealthy_reason,
)
from sharing.health_policy import (
    DEFAULT_IGNORED_XIDS,
    DEFAULT_PROBE_INTERVAL_S,
    DEFAULT_QUIET_PERIOD_S,
    DEFAULT_RESET_REQUIRED_XIDS,
    DOUBLE_BIT_ECC_XID,
    ENV_DISABLE,
    ENV_ENABLE,
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    WHOLE_GPU_SCOPE,
    XID_DESCRIPTIONS,
    HealthSection,
    HealthSettings,
    XidEventLike,
    XidPolicy,
    describe_xid,
    event_xid,
)
from sharing.plan_types import Plan

__all__ = [
    "DEFAULT_IGNORED_XIDS",
    "DEFAULT_PROBE_INTERVAL_S",
    "DEFAULT_QUIET_PERIOD_S",
    "DEFAULT_RESET_REQUIRED_XIDS",
    "DOUBLE_BIT_ECC_XID",
    "ENV_DISABLE",
    "ENV_ENABLE",
    "EVENT_DOUBLE_BIT_ECC",
    "EVENT_SINGLE_BIT_ECC",
    "EVENT_XID_CRITICAL",
    "WHOLE_GPU_SCOPE",
    "XID_DESCRIPTIONS",
    "HealthSection",
    "HealthSettings",
    "PENDING_RESET_ACTIONS",
    "HealthTracker",
    "HealthTransition",
    "XidEventLike",
    "XidPolicy",
    "affected_devices",
    "describe_xid",
    "event_xid",
    "mps_key",
    "route_event",
    "unhealthy_devices",
    "unhealthy_reason",
]

Cause = Literal["lost", "reset", "xid", "mps"]
_CAUSE_ORDER: tuple[Cause, ...] = ("lost", "reset", "xid", "mps")
PENDING_RESET_ACTIONS = frozenset({"gpu_reset", "drain_and_reset"})  # recovery actions
NO_ACTION = "none"


@dataclass
class _Fault:
    cause: Cause
    reason: str
    gpu_uuid: str
    gpu_index: int | None
    xid: int | None
    last_event_at: float
    events: int = 1
    reset_pending_seen: bool = False  # a probe read a pending reset action after this fault


@dataclass
class _GpuProbe:
    last_ok_at: float | None = None
    unanswering: bool = False


@dataclass
class HealthTracker:
    """The health state machine: events, probes and time in; overlay and transitions out."""

    policy: XidPolicy
    quiet_period_s: float = DEFAULT_QUIET_PERIOD_S
    plan: Plan = field(default_factory=lambda: Plan(resources=()))
    inventory: Inventory = field(default_factory=lambda: Inventory(gpus=()))
    _faults: dict[str, dict[Cause, _Fault]] = field(default_factory=dict, init=False)
    _probes: dict[str, _GpuProbe] = field(default_factory=dict, init=False)
    _overlay: dict[str, str] = field(default_factory=dict, init=False)
    version: int = field(default=0, init=False)
    events_seen: int = field(default=0, init=False)
    events_ignored: int = field(default=0, init=False)

    def overlay(self) -> Mapping[str, str]:
        """A read-only copy of the current overlay: physical ID -> reason."""
        return MappingProxyType(dict(self._overlay))

    def set_plan(self, plan: Plan, inventory: Inventory) -> list[HealthTransition]:
        """Adopt a new Plan and Inventory; drops faults of MIG devices that no longer exist."""
        self.plan, self.inventory = plan, inventory
        gone = [
            key
            for key, faults in self._faults.items()
            if not key.startswith("mps:")
            and key != next(iter(faults.values())).gpu_uuid
            and inventory.mig_by_uuid(key) is None
        ]
        out: list[HealthTransition] = []
        for key in gone:
            out += self._clear(key, tuple(self._faults[key]), "MIG device no longer exists")
        return out

    # -- events -----------------------------------------------------------------------------

    def on_event(self, event: XidEventLike, now: float) -> list[HealthTransition]:
        """Apply one NVML event at time `now`; returns the transitions it caused."""
        self.events_seen += 1
        xid = event_xid(event)
        if xid is None or self.policy.is_ignored(xid):
            self.events_ignored += 1
            return []
        cause: Cause = "reset" if self.policy.needs_reset(xid) else "xid"
        reason = describe_xid(xid) + (", reset required" if cause == "reset" else "")
        out: list[HealthTransition] = []
        for key in route_event(event, self.inventory):
            fault = self._faults.get(key, {}).get(cause)
            if fault is not None:
                fault.last_event_at, fault.events = now, fault.events + 1
                continue
            fault = _Fault(cause, reason, event.gpu_uuid, event.gpu_index, xid, now)
            out += self._set(key, fault)
        return out

    def on_events(self, events: Iterable[XidEventLike], now: float) -> list[HealthTransition]:
        """Apply a batch of events at time `now`."""
        out: list[HealthTransition] = []
        for event in events:
            out += self.on_event(event, now)
        return out

    # -- probes and resets ------------------------------------------------------------------

    def on_probe(
        self, gpu_uuid: str, ok: bool, now: float, detail: str = ""
    ) -> list[HealthTransition]:
        """Record an NVML probe of a GPU; a failed probe marks it lost, an answer may end that."""
        if self.policy.disabled:
            return []
        probe = self._probes.setdefault(gpu_uuid, _GpuProbe())
        if not ok:
            was = probe.unanswering
            probe.unanswering = True
            if was:
                return []
            gpu = self.inventory.gpu_by_uuid(gpu_uuid)
            reason = "GPU lost" + (f": {detail}" if detail else "")
            index = gpu.index if gpu else None
            return self._set(gpu_uuid, _Fault("lost", reason, gpu_uuid, index, None, now))
        probe.last_ok_at = now
        if not probe.unanswering:
            return []
        probe.unanswering = False
        return self.on_gpu_reset(gpu_uuid, now)

    def on_gpu_reset(self, gpu_uuid: str, now: float) -> list[HealthTransition]:
        """The GPU was seen again after a reset: clear its lost and reset-class faults."""
        probe = self._probes.setdefault(gpu_uuid, _GpuProbe())
        probe.unanswering, probe.last_ok_at = False, now
        out: list[HealthTransition] = []
        for key, faults in list(self._faults.items()):
            causes = tuple(c for c in ("lost", "reset") if c in faults)
            if causes and faults[causes[0]].gpu_uuid == gpu_uuid:
                out += self._clear(key, causes, "seen again after a reset")
        return out

    def on_recovery_action(
        self, gpu_uuid: str, action: str | None, now: float
    ) -> list[HealthTransition]:
        """A probe of the answering GPU read its recovery action (None: the driver has none).

        A pending reset read after a reset-class fault, then `none`, clears that fault (rule b).
        """
        if self.policy.disabled or action is None or self.gpu_unanswering(gpu_uuid):
            return []
        faults = self._reset_faults(gpu_uuid)
        if action in PENDING_RESET_ACTIONS:
            for _, fault in faults:
                fault.reset_pending_seen = True
            return []
        if action != NO_ACTION:
            return []
        out: list[HealthTransition] = []
        for key, fault in faults:
            if fault.reset_pending_seen:
                why = f"the GPU was reset (recovery action {action})"
                out += self._clear(key, ("reset",), why)
        return out

    def awaiting_reset(self, gpu_uuid: str) -> bool:
        """True while a reset-class fault on this GPU (or a MIG device of it) waits for a reset."""
        return bool(self._reset_faults(gpu_uuid))

    def _reset_faults(self, gpu_uuid: str) -> list[tuple[str, _Fault]]:
        return [
            (key, fault)
            for key, faults in self._faults.items()
            if (fault := faults.get("reset")) is not None and fault.gpu_uuid == gpu_uuid
        ]

    def gpu_unanswering(self, gpu_uuid: str) -> bool:
        """True while the GPU's last probe failed."""
        probe = self._probes.get(gpu_uuid)
        return bool(probe and probe.unanswering)

    # -- MPS ----------------------------------------------------------------------------------

    def on_mps_down(self, resource: str, reason: str, now: float) -> list[HealthTransition]:
        """The MPS daemon of `resource` is down: every device of that resource is Unhealthy."""
        fault = _Fault("mps", f"MPS daemon down: {reason}", "", None, None, now)
        key = mps_key(resource)
        if "mps" in self._faults.get(key, {}):
            return []
        return self._set(key, fault)

    def on_mps_up(self, resource: str) -> list[HealthTransition]:
        """The MPS daemon of `resource` answers again."""
        return self._clear(mps_key(resource), ("mps",), "MPS daemon answers again")

    # -- time -------------------------------------------------------------------------------

    def next_recovery_at(self) -> float | None:
        """Earliest time a recoverable fault's quiet period ends, or None when there is none."""
        ends = [
            f.last_event_at + self.quiet_period_s
            for faults in self._faults.values()
            if (f := faults.get("xid")) is not None
        ]
        return min(ends, default=None)

    def recovery_candidates(self, now: float) -> tuple[str, ...]:
        """UUIDs of GPUs with a recoverable fault whose quiet period has passed (probe these)."""
        uuids = {
            f.gpu_uuid
            for faults in self._faults.values()
            if (f := faults.get("xid")) is not None
            and now - f.last_event_at >= self.quiet_period_s
        }
        return tuple(sorted(uuids))

    def tick(self, now: float) -> list[HealthTransition]:
        """Clear recoverable faults whose quiet period passed and whose GPU answered since."""
        out: list[HealthTransition] = []
        for key, faults in list(self._faults.items()):
            fault = faults.get("xid")
            if fault is None or now - fault.last_event_at < self.quiet_period_s:
                continue
            probe = self._probes.get(fault.gpu_uuid)
            if probe is None or probe.unanswering or probe.last_ok_at is None:
                continue
            if probe.last_ok_at < fault.last_event_at:
                continue
            quiet = f"no critical XID for {self.quiet_period_s:g}s and the GPU answers NVML"
            out += self._clear(key, ("xid",), quiet)
        return out

    # -- internals --------------------------------------------------------------------------

    def _set(self, key: str, fault: _Fault) -> list[HealthTransition]:
        self._faults.setdefault(key, {})[fault.cause] = fault
        return self._refresh(key, fault, "")

    def _clear(self, key: str, causes: tuple[Cause, ...], why: str) -> list[HealthTransition]:
        """Remove faults of these causes from a key, as one transition."""
        faults = self._faults.get(key, {})
        gone = [f for c in causes if (f := faults.pop(c, None)) is not None]
        if not gone:
            return []
        if not faults:
            self._faults.pop(key, None)
        cleared = " and ".join(f.reason for f in gone) + f" cleared: {why}"
        return self._refresh(key, gone[0], cleared)

    def _refresh(self, key: str, fault: _Fault, cleared: str) -> list[HealthTransition]:
        faults = self._faults.get(key, {})
        reason = "; ".join(faults[c].reason for c in _CAUSE_ORDER if c in faults)
        before = self._overlay.get(key)
        if reason:
            self._overlay[key] = reason
        else:
            self._overlay.pop(key, None)
        if before == (reason or None):
            return []
        self.version += 1
        transition = HealthTransition(
            key=key,
            healthy=not reason,
            reason=reason,
            affected=affected_devices(self.plan, key),
            gpu_index=fault.gpu_index,
            gpu_uuid=fault.gpu_uuid,
            xid=fault.xid,
            cleared=cleared,
        )
        return [transition]
