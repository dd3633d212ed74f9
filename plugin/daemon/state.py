"""NodeState: the current Plan, the health overlay, and versioned per-resource device snapshots.

ListAndWatch streams wait on one condition and send the full list whenever their resource's
snapshot changed. Snapshots are immutable tuples built once per change, never per stream.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import NamedTuple

from sharing.health import mps_key
from sharing.plan_types import Plan, ResourcePlan


class DeviceState(NamedTuple):
    """One advertised device as the kubelet sees it."""

    id: str
    healthy: bool
    numa_node: int | None


Snapshot = tuple[DeviceState, ...]


def build_snapshot(resource: ResourcePlan, overlay: Mapping[str, str]) -> Snapshot:
    """The devices of a resource with health from the overlay (parent GPU, MIG device or MPS).

    The rule is sharing.health.unhealthy_reason's, with the resource-wide MPS key looked up
    once per resource instead of once per device.
    """
    resource_down = mps_key(resource.name) in overlay
    return tuple(
        DeviceState(
            d.id,
            not (resource_down or d.physical_id in overlay or d.gpu_uuid in overlay),
            d.numa_node,
        )
        for d in resource.devices
    )


class NodeState:
    """The Plan and health overlay the daemon serves, with a version per resource snapshot."""

    def __init__(self, plan: Plan | None = None) -> None:
        self._cond = threading.Condition()
        self._plan = plan if plan is not None else Plan(resources=())
        self._overlay: dict[str, str] = {}
        self._version = 0
        self._snapshots: dict[str, tuple[int, Snapshot]] = {}
        self._closed = False
        with self._cond:
            self._rebuild()

    @property
    def plan(self) -> Plan:
        """The Plan now served."""
        return self._plan

    @property
    def overlay(self) -> Mapping[str, str]:
        """The health overlay now applied: physical ID or key -> reason."""
        return dict(self._overlay)

    @property
    def version(self) -> int:
        """The node-wide version, moved by every plan or overlay change."""
        return self._version

    def set_plan(self, plan: Plan, overlay: Mapping[str, str] | None = None) -> None:
        """Serve a new Plan (with a new health overlay at the same time, when given); streams
        of resources whose device list changed are woken."""
        with self._cond:
            self._plan = plan
            if overlay is not None:
                self._overlay = dict(overlay)
            self._rebuild()

    def set_overlay(self, overlay: Mapping[str, str]) -> None:
        """Apply a new health overlay (physical ID, GPU UUID or `mps:<resource>` -> reason)."""
        with self._cond:
            self._overlay = dict(overlay)
            self._rebuild()

    def snapshot(self, resource_name: str) -> tuple[int, Snapshot | None]:
        """(version, devices) of a resource; devices is None when the plan has no such resource."""
        with self._cond:
            return self._current(resource_name)

    def wait(
        self,
        resource_name: str,
        last_version: int,
        timeout_s: float,
        cancelled: threading.Event | None = None,
    ) -> tuple[int, Snapshot | None]:
        """Wait until the resource's snapshot version differs from `last_version`, `cancelled`
        is set (checked when woken by wake()) or time runs out.

        Returns the current (version, devices) either way; devices is None for an unknown resource.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed
                or (cancelled is not None and cancelled.is_set())
                or self._current(resource_name)[0] != last_version,
                timeout=timeout_s,
            )
            return self._current(resource_name)

    def wake(self) -> None:
        """Wake every waiter so it checks its `cancelled` event (a server stopping)."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Release every waiter for good; later waits return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _current(self, resource_name: str) -> tuple[int, Snapshot | None]:
        entry = self._snapshots.get(resource_name)
        if entry is None:
            return -1, None
        return entry

    def _rebuild(self) -> None:
        """New snapshots for resources whose device list or health changed; wake the streams."""
        self._version += 1
        fresh: dict[str, tuple[int, Snapshot]] = {}
        for resource in self._plan.resources:
            devices = build_snapshot(resource, self._overlay)
            old = self._snapshots.get(resource.name)
            fresh[resource.name] = old if old and old[1] == devices else (self._version, devices)
        self._snapshots = fresh
        self._cond.notify_all()
