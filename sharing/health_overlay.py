"""The health overlay and how it reaches virtual devices: event routing, propagation, transitions.

The overlay maps a physical ID to the reason it is unhealthy. Keys are a GPU UUID (whole-GPU
events, lost GPUs), a MIG device UUID (events scoped to a GPU instance / compute instance) or
`mps:<resource>` (that resource's MPS daemon is down). One rule turns the overlay into virtual
device health (`unhealthy_reason`): a virtual device of resource R is Unhealthy when its
physical ID, its parent GPU UUID or `mps:<R>` is in the overlay. So a GPU event reaches every
replica of the GPU, every MIG device on it and every replica of those, in every resource. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sharing.devices import Inventory
from sharing.health_policy import WHOLE_GPU_SCOPE, XidEventLike
from sharing.plan_types import Plan, VirtualDevice


def mps_key(resource: str) -> str:
    """Overlay key of the MPS daemon that serves `resource`."""
    return f"mps:{resource}"


def _scope_id(value: int | None) -> int | None:
    return None if value is None or value == WHOLE_GPU_SCOPE else value


def route_event(event: XidEventLike, inventory: Inventory) -> tuple[str, ...]:
    """Overlay keys an event marks: the GPU UUID, or the MIG devices with its GI (and CI) ID.

    A GI/CI-scoped event on a GPU without a matching MIG device marks the whole GPU.
    """
    gpu = inventory.gpu_by_uuid(event.gpu_uuid)
    gi, ci = _scope_id(event.gi_id), _scope_id(event.ci_id)
    if gpu is None or gi is None:
        return (event.gpu_uuid,)
    keys = tuple(
        mig.uuid
        for mig in gpu.mig_devices
        if mig.gi_id == gi and (ci is None or mig.ci_id == ci)
    )
    return keys or (gpu.uuid,)


def unhealthy_reason(
    resource: str, device: VirtualDevice, overlay: Mapping[str, str]
) -> str | None:
    """Why a virtual device of `resource` is Unhealthy under the overlay, or None if Healthy."""
    for key in (device.physical_id, device.gpu_uuid, mps_key(resource)):
        reason = overlay.get(key)
        if reason is not None:
            return reason
    return None


def unhealthy_devices(plan: Plan, overlay: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Resource name -> {virtual device ID: reason} for every Unhealthy virtual device."""
    result: dict[str, dict[str, str]] = {}
    for res in plan.resources:
        marked = {
            dev.id: reason
            for dev in res.devices
            if (reason := unhealthy_reason(res.name, dev, overlay)) is not None
        }
        if marked:
            result[res.name] = marked
    return result


def affected_devices(plan: Plan, overlay_key: str) -> int:
    """Number of virtual devices, over all resources, that an overlay key makes Unhealthy."""
    count = 0
    for res in plan.resources:
        if overlay_key == mps_key(res.name):
            count += len(res.devices)
            continue
        count += sum(1 for d in res.devices if overlay_key in (d.physical_id, d.gpu_uuid))
    return count


@dataclass(frozen=True)
class HealthTransition:
    """One change of one overlay key, with what a log line needs."""

    key: str
    healthy: bool
    reason: str  # why it is unhealthy now ("" when healthy)
    affected: int  # virtual devices whose health this key decides
    gpu_index: int | None = None
    gpu_uuid: str = ""
    xid: int | None = None
    cleared: str = ""  # what stopped counting against it, and why

    @property
    def message(self) -> str:
        """`gpu 3 (GPU-…) unhealthy: XID 79 (…), reset required; 4 virtual devices affected`."""
        if self.key.startswith("mps:"):
            subject = f"MPS daemon of {self.key[4:]}"
        else:
            gpu = f"gpu {self.gpu_index} ({self.gpu_uuid})"
            subject = gpu if self.key == self.gpu_uuid else f"MIG device {self.key} on {gpu}"
        noun = "virtual device" if self.affected == 1 else "virtual devices"
        count = f"{self.affected} {noun} affected"
        if self.healthy:
            return f"{subject} healthy again: {self.cleared}; {count}"
        if self.cleared:
            return f"{subject} still unhealthy: {self.reason} ({self.cleared}); {count}"
        return f"{subject} unhealthy: {self.reason}; {count}"
