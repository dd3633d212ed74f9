"""The strategy contract and the values strategies work on.

A strategy turns a `ResourceGroup` (the physical devices one advertised resource covers, each with
its replica count and the config entry that chose it) into a `ResourcePlan` of virtual devices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from sharing.config_models import ReplicatedResource
from sharing.devices import Gpu, MigDevice, VirtualDeviceId
from sharing.plan_types import ResourcePlan, ServeOptions, Strategy, VirtualDevice


@dataclass(frozen=True)
class PhysicalDevice:
    """A device that can be advertised on its own: a full GPU or one MIG device."""

    gpu: Gpu
    mig: MigDevice | None = None

    @property
    def uuid(self) -> str:
        """NVML UUID (GPU-… or MIG-…)."""
        return self.mig.uuid if self.mig else self.gpu.uuid

    @property
    def index_id(self) -> str:
        """ "3" for GPU 3, "3:1" for MIG device 1 on GPU 3."""
        return f"{self.gpu.index}:{self.mig.index}" if self.mig else str(self.gpu.index)

    @property
    def sort_key(self) -> tuple[int, int]:
        """GPU index, then MIG device index (-1 for a full GPU)."""
        return (self.gpu.index, self.mig.index if self.mig else -1)

    def describe(self) -> str:
        """Human form for messages: `GPU 3 (GPU-…)` or `MIG device 3:1 (MIG-…, 1g.5gb)`."""
        if self.mig is None:
            return f"GPU {self.gpu.index} ({self.gpu.uuid})"
        return f"MIG device {self.index_id} ({self.mig.uuid}, {self.mig.profile})"


@dataclass(frozen=True)
class Member:
    """One physical device of a resource, how many replicas it gives, and who chose it."""

    device: PhysicalDevice
    replicas: int = 1
    entry: ReplicatedResource | None = None
    entry_path: str = ""  # e.g. "sharing.mps.resources[0]"; "" for unshared devices


@dataclass(frozen=True)
class ResourceGroup:
    """The physical devices of one advertised resource, before expansion into virtual devices."""

    name: str
    original_name: str
    strategy: Strategy
    members: tuple[Member, ...]
    fail_requests_greater_than_one: bool = False
    section_path: str = ""  # "sharing.timeSlicing" / "sharing.mps"; "" for unshared


class SharingStrategy(Protocol):
    """How one strategy expands a resource group into a ResourcePlan."""

    name: Strategy

    def build_resource(self, group: ResourceGroup, options: ServeOptions) -> ResourcePlan:
        """The ResourcePlan for the group.

        Raises:
            PlanError: the group cannot be served with this strategy on this node.
        """
        ...


def dev_paths(device: PhysicalDevice) -> tuple[str, ...]:
    """Device nodes of a physical device as the container sees them (`/dev/nvidia<minor>`, and
    for MIG the GI and CI access files); the host path is the same under nvidiaDevRoot."""
    paths = [f"/dev/nvidia{device.gpu.minor}"]
    mig = device.mig
    if mig is not None:
        for minor in (mig.gi_cap_minor, mig.ci_cap_minor):
            if minor is not None:
                paths.append(f"/dev/nvidia-caps/nvidia-cap{minor}")
    return tuple(paths)


def virtual_devices(member: Member, shared: bool) -> list[VirtualDevice]:
    """The virtual devices of one member: the device itself, or its replicas `<uuid>::<n>`.

    The MIG identity is kept without its running processes: they are not served, and a process
    starting or ending must not make the plan differ.
    """
    device = member.device
    mig = replace(device.mig, processes=()) if device.mig else None
    common = {
        "physical_id": device.uuid,
        "gpu_uuid": device.gpu.uuid,
        "gpu_index": device.gpu.index,
        "numa_node": device.gpu.numa_node,
        "mig": mig,
        "index_id": device.index_id,
        "dev_paths": dev_paths(device),
    }
    if not shared:
        return [VirtualDevice(id=device.uuid, **common)]
    return [
        VirtualDevice(id=str(VirtualDeviceId.make(device.uuid, n)), replica=n, **common)
        for n in range(member.replicas)
    ]


def expand(group: ResourceGroup, options: ServeOptions, strategy: Strategy) -> ResourcePlan:
    """A ResourcePlan with every member expanded, in GPU / MIG index order, no MPS spec."""
    shared = strategy != "none"
    members = sorted(group.members, key=lambda m: m.device.sort_key)
    devices: list[VirtualDevice] = []
    for member in members:
        devices.extend(virtual_devices(member, shared))
    return ResourcePlan(
        name=group.name,
        original_name=group.original_name,
        strategy=strategy,
        devices=tuple(devices),
        replicas=tuple((m.device.uuid, m.replicas if shared else 1) for m in members),
        fail_requests_greater_than_one=group.fail_requests_greater_than_one if shared else False,
    )
