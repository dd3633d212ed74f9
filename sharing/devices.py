"""Value types for physical devices, the node inventory and virtual (replica) device IDs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from sharing.errors import SharingError

REPLICA_SEPARATOR = "::"


class ComputeMode(str, Enum):
    """NVML compute modes (values are the NVML constants)."""

    DEFAULT = "Default"
    EXCLUSIVE_THREAD = "ExclusiveThread"
    PROHIBITED = "Prohibited"
    EXCLUSIVE_PROCESS = "ExclusiveProcess"


@dataclass(frozen=True)
class MigDevice:
    """One MIG device: a GPU instance plus one compute instance, as NVML reports it."""

    uuid: str
    parent_uuid: str
    parent_index: int
    index: int  # MIG device handle index on the parent (used for `<gpu>:<mig>` index IDs)
    gi_id: int
    ci_id: int
    profile: str  # canonical name, e.g. "1g.5gb" or "1g.5gb+me"
    placement_start: int
    placement_size: int
    memory_mib: int
    multiprocessor_count: int = 0
    gi_cap_minor: int | None = None  # /dev/nvidia-caps/nvidia-cap<N> of the GI access file
    ci_cap_minor: int | None = None
    processes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as NVML reports it. `lost` marks a GPU that stopped answering."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    pci_bus_id: str
    pci_device_id: int  # e.g. 0x20B010DE (device << 16 | vendor)
    minor: int
    numa_node: int | None
    cuda_compute_capability: tuple[int, int]
    mig_capable: bool = False
    mig_enabled: bool = False  # current mode
    mig_pending: bool = False  # pending mode (differs from current on Ampere until reset)
    compute_mode: ComputeMode = ComputeMode.DEFAULT
    mig_devices: tuple[MigDevice, ...] = ()
    processes: tuple[int, ...] = ()
    lost: bool = False
    lost_reason: str = ""

    @property
    def product(self) -> str:
        """Model name with spaces replaced by '-', as in node labels."""
        return self.name.replace(" ", "-")


@dataclass(frozen=True)
class Inventory:
    """Everything gpushare knows about a node's GPUs at one moment. Immutable.

    `link_scores[i][j]` is the topology score between GPU indices i and j (facts §3:
    100 per NVLink, else PCIe relation 60/50/40/30/20/10); the diagonal is 0.
    """

    gpus: tuple[Gpu, ...]
    link_scores: tuple[tuple[int, ...], ...] = ()
    nvlink_counts: tuple[tuple[int, ...], ...] = ()
    driver_version: str = ""
    cuda_driver_version: int = 0
    _by_uuid: dict[str, Gpu] = field(default_factory=dict, init=False, repr=False, compare=False)
    _mig_by_uuid: dict[str, MigDevice] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for gpu in self.gpus:
            self._by_uuid[gpu.uuid] = gpu
            for mig in gpu.mig_devices:
                self._mig_by_uuid[mig.uuid] = mig

    def gpu(self, index: int) -> Gpu:
        """The GPU with this NVML index."""
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        raise KeyError(f"no GPU with index {index}")

    def gpu_by_uuid(self, uuid: str) -> Gpu | None:
        """The GPU with this UUID, or None."""
        return self._by_uuid.get(uuid)

    def mig_by_uuid(self, uuid: str) -> MigDevice | None:
        """The MIG device with this UUID, or None."""
        return self._mig_by_uuid.get(uuid)

    def link_score(self, a: int, b: int) -> int:
        """Topology score between two GPU indices (0 when unknown)."""
        if a == b or not self.link_scores:
            return 0
        return self.link_scores[a][b]


class BadDeviceId(SharingError):
    """A device ID string is not a valid physical or replica ID."""


@dataclass(frozen=True, order=True)
class VirtualDeviceId:
    """A device ID as the kubelet sees it: `<physical-id>` or `<physical-id>::<replica>`."""

    physical: str
    replica: int | None = None

    @classmethod
    def make(cls, physical: str, replica: int | None) -> VirtualDeviceId:
        """Build an ID; replica None means the unshared physical device."""
        if not physical or REPLICA_SEPARATOR in physical:
            raise BadDeviceId(f"invalid physical device id {physical!r}")
        if replica is not None and replica < 0:
            raise BadDeviceId(f"invalid replica index {replica} for {physical!r}")
        return cls(physical, replica)

    @classmethod
    def parse(cls, text: str) -> VirtualDeviceId:
        """Parse `<physical>` or `<physical>::<n>`; raises BadDeviceId on a bad suffix."""
        physical, sep, suffix = text.partition(REPLICA_SEPARATOR)
        if not physical:
            raise BadDeviceId(f"invalid device id {text!r}: empty physical id")
        if not sep:
            return cls(physical, None)
        if not suffix.isdigit():
            raise BadDeviceId(f"invalid device id {text!r}: replica suffix must be a number")
        return cls(physical, int(suffix))

    def __str__(self) -> str:
        if self.replica is None:
            return self.physical
        return f"{self.physical}{REPLICA_SEPARATOR}{self.replica}"


def strip_replicas(ids: list[str] | tuple[str, ...]) -> list[str]:
    """Physical IDs of the given IDs: replica suffixes removed, duplicates dropped, order kept."""
    seen: dict[str, None] = {}
    for text in ids:
        seen.setdefault(text.partition(REPLICA_SEPARATOR)[0], None)
    return list(seen)
