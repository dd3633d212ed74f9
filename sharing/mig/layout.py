"""Value types of MIG layouts: placements, what a GPU has now, and what it should have.

`GpuMigState` is what the NVML edge reads for one GPU (sharing.nvml.mig_state); `Layout` is a
GPU's MIG mode plus its GPU instances by placement; `LayoutRequest` is what a mig-parted entry asks
for once its profile names are resolved for that GPU (mode plus a count per profile).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from sharing.nvml.profiles import MigProfile
from sharing.ranges import index_ranges


def slot_ranges(slots: Iterable[int]) -> str:
    """`slot 4`, `slots 0-3`, `slots 0-3, 6`: memory slots as a message names them."""
    ordered = set(slots)
    text = index_ranges(ordered)
    return f"slot {text}" if len(ordered) == 1 else f"slots {text}"


@dataclass(frozen=True, order=True)
class Placement:
    """A GPU instance of `profile` on memory slots [start, start+size)."""

    start: int
    size: int
    profile: str

    @property
    def slots(self) -> range:
        """The memory slots it occupies."""
        return range(self.start, self.start + self.size)

    def __str__(self) -> str:
        return f"{self.profile}@{self.start}"


@dataclass(frozen=True)
class ComputeInstanceState:
    """A compute instance inside a GPU instance."""

    ci_id: int
    slices: int


@dataclass(frozen=True)
class GpuInstanceState:
    """A GPU instance as NVML reports it, with its compute instances."""

    gi_id: int
    profile: str
    slices: int  # compute slices of the GI's profile
    start: int
    size: int
    compute_instances: tuple[ComputeInstanceState, ...] = ()

    @property
    def placement(self) -> Placement:
        """Where it sits."""
        return Placement(self.start, self.size, self.profile)

    @property
    def full(self) -> bool:
        """A full MIG device: exactly one compute instance using every compute slice."""
        cis = self.compute_instances
        return len(cis) == 1 and cis[0].slices == self.slices

    def describe(self) -> str:
        """`3g.20gb@4`, with a note when it is not one full MIG device."""
        if self.full:
            return str(self.placement)
        if not self.compute_instances:
            return f"{self.placement} (GPU instance {self.gi_id} without compute instance)"
        sizes = "+".join(f"{ci.slices}c" for ci in self.compute_instances)
        return f"{self.placement} (GPU instance {self.gi_id} with compute instances {sizes})"


@dataclass(frozen=True)
class Layout:
    """A GPU's MIG mode and its GPU instances, each a full MIG device, by start."""

    mig_enabled: bool
    placements: tuple[Placement, ...] = ()

    def counts(self) -> dict[str, int]:
        """Profile name -> how many."""
        return dict(Counter(p.profile for p in self.placements))

    def describe(self) -> str:
        """`MIG disabled`, `MIG enabled, no MIG devices` or `3g.20gb@0 2g.10gb@4 ...`."""
        if not self.mig_enabled:
            return "MIG disabled"
        if not self.placements:
            return "MIG enabled, no MIG devices"
        return " ".join(str(p) for p in sorted(self.placements))


@dataclass(frozen=True)
class LayoutRequest:
    """What a config asks of one GPU: MIG on or off, and a count per resolved profile name."""

    mig_enabled: bool
    counts: tuple[tuple[str, int], ...] = ()  # in the order the file lists them

    def describe(self) -> str:
        """`MIG disabled`, `MIG enabled, no MIG devices` or `2x 1g.5gb, 1x 3g.20gb`."""
        if not self.mig_enabled:
            return "MIG disabled"
        if not self.counts:
            return "MIG enabled, no MIG devices"
        return ", ".join(f"{n}x {name}" for name, n in self.counts)


@dataclass(frozen=True)
class GpuMigState:
    """Everything the planner needs to know about one GPU, read from NVML at one moment."""

    index: int
    uuid: str
    name: str
    pci_device_id: int = 0
    pci_subsystem_id: int = 0
    mig_capable: bool = False
    mig_current: bool = False
    mig_pending: bool = False
    mode_change_needs_reset: bool = False  # Ampere: a mode change takes effect through a reset
    profiles: tuple[MigProfile, ...] = ()
    instances: tuple[GpuInstanceState, ...] = ()
    processes: tuple[int, ...] = ()
    lost_reason: str = ""

    @property
    def label(self) -> str:
        """`GPU 2 (NVIDIA A100-SXM4-40GB)`, how messages name a GPU."""
        return f"GPU {self.index} ({self.name})" if self.name else f"GPU {self.index}"

    def layout(self) -> Layout:
        """The current layout, counting only full MIG devices."""
        full = tuple(sorted(gi.placement for gi in self.instances if gi.full))
        return Layout(self.mig_current, full)

    def describe(self) -> str:
        """The current state in words, incomplete instances and a pending mode included."""
        if self.lost_reason:
            return f"lost ({self.lost_reason})"
        if not self.mig_capable:
            return "not MIG capable"
        text = "MIG enabled" if self.mig_current else "MIG disabled"
        if self.mig_pending != self.mig_current:
            text += f" ({'enable' if self.mig_pending else 'disable'} pending a GPU reset)"
        if self.mig_current:
            parts = [gi.describe() for gi in sorted(self.instances, key=lambda g: g.start)]
            text += ": " + " ".join(parts) if parts else ", no MIG devices"
        return text

    def matches(self, request: LayoutRequest) -> bool:
        """Whether the GPU already has exactly what the request asks (any placement)."""
        if self.mig_capable and self.mig_pending != self.mig_current:
            return False
        if not request.mig_enabled:
            return not self.mig_current
        if not self.mig_current or not all(gi.full for gi in self.instances):
            return False
        wanted = {name: n for name, n in request.counts if n}
        return self.layout().counts() == wanted
