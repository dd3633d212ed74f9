"""The Plan's value types: what the node serves, as immutable values.

`sharing.plan.build_plan` produces a Plan; the strategies and the labels build its parts. This
module imports no strategy, so the dependency runs one way: strategies, labels -> these types,
build_plan -> strategies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sharing.devices import MigDevice

Strategy = Literal["none", "time-slicing", "mps"]
DeviceListStrategy = Literal["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"]


@dataclass(frozen=True)
class ServeOptions:
    """Resolved flags that shape how devices are handed to containers (facts §2, §7)."""

    device_list_strategy: tuple[DeviceListStrategy, ...] = ("envvar",)
    device_id_strategy: Literal["uuid", "index"] = "uuid"
    pass_device_specs: bool = False
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    cdi_kind: str = "k8s.device-plugin.nvidia.com/gpu"
    nvidia_dev_root: str = "/"
    container_driver_root: str = "/driver-root"
    shared_devices_allocation_policy: Literal["distributed", "packed"] = "distributed"
    mig_strategy: Literal["none", "single", "mixed"] = "none"
    mps_root: str = ""


@dataclass(frozen=True)
class VirtualDevice:
    """One device ID advertised to the kubelet, with links to its physical parents."""

    id: str  # as advertised: physical UUID, or "<physical>::<n>"
    physical_id: str  # GPU-… or MIG-… UUID
    gpu_uuid: str  # parent GPU (== physical_id for a full GPU)
    gpu_index: int
    replica: int | None = None
    numa_node: int | None = None
    mig: MigDevice | None = None
    index_id: str = ""  # "3" for GPU 3, "3:1" for MIG device 1 on GPU 3
    dev_paths: tuple[str, ...] = ()  # device nodes: /dev/nvidia<minor>, MIG cap files


@dataclass(frozen=True)
class MpsSpec:
    """What the MPS control daemon of one resource must enforce."""

    resource: str
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    active_thread_percentage: int
    pinned_mem_limit_mib: tuple[tuple[int, int], ...]  # (gpu index, MiB) per GPU
    max_clients_per_gpu: int
    pipe_dir: str
    log_dir: str
    shm_dir: str


@dataclass(frozen=True)
class ResourcePlan:
    """One extended resource: its name, how it is shared, and its virtual devices."""

    name: str  # advertised name, e.g. "nvidia.com/gpu.shared"
    original_name: str  # name before rename, e.g. "nvidia.com/gpu"
    strategy: Strategy
    devices: tuple[VirtualDevice, ...]
    replicas: tuple[tuple[str, int], ...] = ()  # (physical id, replica count) per parent
    fail_requests_greater_than_one: bool = False
    mps: MpsSpec | None = None
    _by_id: dict[str, VirtualDevice] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _by_parent: dict[str, tuple[VirtualDevice, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        groups: dict[str, list[VirtualDevice]] = {}
        for device in self.devices:
            self._by_id[device.id] = device
            groups.setdefault(device.physical_id, []).append(device)
        self._by_parent.update((k, tuple(v)) for k, v in groups.items())

    @property
    def suffix(self) -> str:
        """The part of the name after the vendor domain, used in the socket file name."""
        return self.name.rsplit("/", 1)[-1]

    @property
    def socket_name(self) -> str:
        """Socket file name of this resource's server inside the kubelet directory."""
        return f"gpushare-{self.suffix}.sock"

    def device(self, device_id: str) -> VirtualDevice | None:
        """The virtual device with this advertised ID, or None."""
        return self._by_id.get(device_id)

    def devices_of(self, physical_id: str) -> tuple[VirtualDevice, ...]:
        """The virtual devices (replicas) of one physical parent, in replica order."""
        return self._by_parent.get(physical_id, ())

    @property
    def physical_ids(self) -> tuple[str, ...]:
        """Physical parents of this resource's devices, in plan order."""
        return tuple(self._by_parent)

    @property
    def shared(self) -> bool:
        """True when the devices are replicas of shared physical devices."""
        return self.strategy != "none"


@dataclass(frozen=True)
class PlanDiff:
    """Resources that appeared, vanished or changed between two plans (by advertised name)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    options_changed: bool = False

    @property
    def empty(self) -> bool:
        """True when nothing differs."""
        return not (self.added or self.removed or self.changed or self.options_changed)


@dataclass(frozen=True)
class Plan:
    """Everything the daemon serves. Immutable; a change builds a new Plan."""

    resources: tuple[ResourcePlan, ...]
    options: ServeOptions = ServeOptions()
    labels: tuple[tuple[str, str], ...] = ()
    # GPU link score matrix by GPU index (facts §3), copied from the Inventory for allocation.
    topology: tuple[tuple[int, ...], ...] = ()

    def resource(self, name: str) -> ResourcePlan | None:
        """The resource with this advertised name, or None."""
        for res in self.resources:
            if res.name == name:
                return res
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """Advertised resource names, in plan order."""
        return tuple(r.name for r in self.resources)

    def diff(self, other: Plan) -> PlanDiff:
        """What changes going from self to other."""
        mine = {r.name: r for r in self.resources}
        theirs = {r.name: r for r in other.resources}
        return PlanDiff(
            added=tuple(n for n in theirs if n not in mine),
            removed=tuple(n for n in mine if n not in theirs),
            changed=tuple(n for n in theirs if n in mine and mine[n] != theirs[n]),
            options_changed=self.options != other.options,
        )
