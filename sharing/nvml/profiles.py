"""MIG profile facts (facts §6.2, §6.3): canonical names, the GB formula and per-card tables.

The adapter names MIG devices from what NVML reports (slice count, memory, profile index) with
`canonical_name`; the per-card tables describe the hardware for the simulated NVML and for
placement planning before any GPU is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pynvml

MIB = 1024 * 1024
GIB_MIB = 1024

# NVML GPU instance profile index -> attribute suffix of the canonical name.
_ATTR_BY_INDEX: dict[int, str] = {
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: "+me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1: "+me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME: "-me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME: "-me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME: "+me.all",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME: "+me.all",
}

# Full compute instance profile index for a GI with this many compute slices.
CI_PROFILE_INDEX_BY_SLICES: dict[int, int] = {
    1: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE,
    2: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE,
    3: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE,
    4: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
    6: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_6_SLICE,
    7: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE,
    8: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_8_SLICE,
}


def memory_gb(profile_mib: int, total_mib: int) -> int:
    """GB of a MIG profile as its name shows it (facts §6.2, rounding half away from zero)."""
    fraction = math.ceil(profile_mib / total_mib * 8) / 8
    total_gib = math.ceil(total_mib / GIB_MIB)
    return math.floor(fraction * total_gib + 0.5)


def attr_suffix(profile_index: int) -> str:
    """The `+me`/`+gfx`/`-me`/`+me.all` suffix of a GI profile index ('' for plain profiles)."""
    return _ATTR_BY_INDEX.get(profile_index, "")


def canonical_name(
    slices: int, profile_mib: int, total_mib: int, profile_index: int, ci_slices: int | None = None
) -> str:
    """`[<C>c.]<G>g.<GB>gb[+attr]`; the `<C>c.` prefix only for a CI smaller than its GI."""
    prefix = f"{ci_slices}c." if ci_slices is not None and ci_slices != slices else ""
    gb = memory_gb(profile_mib, total_mib)
    return f"{prefix}{slices}g.{gb}gb{attr_suffix(profile_index)}"


def gpu_instance_id(total_slots: int, start: int, size: int) -> int:
    """GI ID the hardware gives a GI at [start, start+size) (facts §6.3)."""
    return (total_slots // size - 1) + start // size


@dataclass(frozen=True)
class MigProfile:
    """One GPU instance profile of a card: NVML index and id, size, limits and allowed starts."""

    name: str
    index: int  # NVML_GPU_INSTANCE_PROFILE_* value
    id: int  # NVML profile id (what Create/GetGpuInstances take)
    slices: int  # compute slices (the G of the name)
    size: int  # memory slots occupied (placement size)
    max_count: int
    starts: tuple[int, ...]
    memory_mib: int
    multiprocessor_count: int

    def slots(self, start: int) -> range:
        """The memory slots a GI of this profile at `start` occupies."""
        return range(start, start + self.size)


@dataclass(frozen=True)
class CardModel:
    """A GPU product as the simulated NVML presents it; `profiles` empty when not MIG capable."""

    key: str  # short model key used in node YAML files, e.g. "A100-SXM4-40GB"
    name: str  # NVML product name
    pci_device_id: int
    memory_mib: int
    compute_capability: tuple[int, int]
    arch: str  # "ampere" | "hopper" | "ada"
    mig_slots: int = 0
    profiles: tuple[MigProfile, ...] = ()
    ecc: bool = True
    nvlink_links: int = 0  # NVLink links per GPU (0: none)
    # nvmlDeviceGetSupportedEventTypes as read on the real card; None where no reading exists
    # (the simulator then derives the mask from ECC and MIG capability).
    supported_event_types: int | None = None

    @property
    def mig_capable(self) -> bool:
        """Whether the card supports MIG."""
        return bool(self.profiles)

    @property
    def mig_needs_reset(self) -> bool:
        """Ampere applies a MIG mode change only after a GPU reset (facts §6.3)."""
        return self.arch == "ampere"

    def profile_by_index(self, index: int) -> MigProfile | None:
        """The profile with this NVML profile index, or None."""
        return next((p for p in self.profiles if p.index == index), None)

    def profile_by_id(self, profile_id: int) -> MigProfile | None:
        """The profile with this NVML profile id, or None."""
        return next((p for p in self.profiles if p.id == profile_id), None)

    def profile_by_name(self, name: str) -> MigProfile | None:
        """The profile with this canonical name, or None."""
        return next((p for p in self.profiles if p.name == name), None)


_P = pynvml
_EIGHT_SLOT_SHAPES = (
    # index, id, slices, size, max, starts
    (_P.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, 1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    (_P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    (_P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, 1, 2, 4, (0, 2, 4, 6)),
    (_P.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, 2, 2, 3, (0, 2, 4)),
    (_P.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, 3, 4, 2, (0, 4)),
    (_P.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, 4, 4, 1, (0,)),
    (_P.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, 7, 8, 1, (0,)),
)
_A30_SHAPES = (
    (_P.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 14, 1, 1, 4, (0, 1, 2, 3)),
    (_P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 21, 1, 1, 1, (0, 1, 2, 3)),
    (_P.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 5, 2, 2, 2, (0, 2)),
    (_P.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1, 6, 2, 2, 1, (0, 2)),
    (_P.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 0, 4, 4, 1, (0,)),
)


def _profiles(
    shapes: tuple, total_mib: int, memory_mib: tuple[int, ...], sms: tuple[int, ...]
) -> tuple[MigProfile, ...]:
    out = []
    for (index, pid, slices, size, max_count, starts), mib, sm in zip(
        shapes, memory_mib, sms, strict=True
    ):
        name = canonical_name(slices, mib, total_mib, index)
        out.append(MigProfile(name, index, pid, slices, size, max_count, starts, mib, sm))
    return tuple(out)


def _eight_slot(
    key: str, name: str, pci: int, total: int, mem: tuple, sms: tuple, **kw: Any
) -> CardModel:
    profiles = _profiles(_EIGHT_SLOT_SHAPES, total, mem, sms)
    return CardModel(key, name, pci, total, mig_slots=8, profiles=profiles, **kw)


_A100_SMS = (14, 14, 14, 28, 42, 56, 98)
_H100_SMS = (16, 16, 26, 32, 60, 64, 132)
_A100_80_MIB = (9728, 9728, 19968, 19968, 39936, 39936, 80896)
_H100_MIB = (9984, 9984, 19968, 19968, 40192, 40192, 80384)
# Read from a real H200 (driver 580.159.04, MIG mode off; facts §6.3): memorySizeMB per profile
# in table order (1_SLICE, +me, REV2, 2_SLICE, 3_SLICE, 4_SLICE, 7_SLICE), and the event mask.
_H200_MIB = (16384, 16384, 33280, 33280, 71424, 71424, 143360)
H200_SUPPORTED_EVENT_TYPES = 0xFF9F

CARDS: dict[str, CardModel] = {
    card.key: card
    for card in (
        _eight_slot("A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB", 0x20B010DE, 40960,
                    (4864, 4864, 9856, 9856, 19968, 19968, 40192), _A100_SMS,
                    compute_capability=(8, 0), arch="ampere", nvlink_links=12),
        _eight_slot("A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", 0x20B210DE, 81920,
                    _A100_80_MIB, _A100_SMS,
                    compute_capability=(8, 0), arch="ampere", nvlink_links=12),
        _eight_slot("A100-PCIE-80GB", "NVIDIA A100 80GB PCIe", 0x20B510DE, 81920,
                    _A100_80_MIB, _A100_SMS,
                    compute_capability=(8, 0), arch="ampere", nvlink_links=12),
        _eight_slot("H100-SXM5-80GB", "NVIDIA H100 80GB HBM3", 0x233010DE, 81559,
                    _H100_MIB, _H100_SMS,
                    compute_capability=(9, 0), arch="hopper", nvlink_links=18),
        _eight_slot("H100-PCIE-80GB", "NVIDIA H100 PCIe", 0x233110DE, 81559,
                    _H100_MIB, _H100_SMS,
                    compute_capability=(9, 0), arch="hopper", nvlink_links=18),
        _eight_slot("H100-NVL-94GB", "NVIDIA H100 NVL", 0x232110DE, 95830,
                    (11008, 11008, 22784, 22784, 46848, 46848, 93952), _H100_SMS,
                    compute_capability=(9, 0), arch="hopper", nvlink_links=18),
        _eight_slot("H200-SXM-141GB", "NVIDIA H200", 0x233510DE, 143771,
                    _H200_MIB, _H100_SMS,
                    compute_capability=(9, 0), arch="hopper", nvlink_links=18,
                    supported_event_types=H200_SUPPORTED_EVENT_TYPES),
        CardModel("A30", "NVIDIA A30", 0x20B710DE, 24576, (8, 0), "ampere", mig_slots=4,
                  profiles=_profiles(_A30_SHAPES, 24576, (5952, 5952, 11904, 11904, 24192),
                                     (14, 14, 28, 28, 56)),
                  nvlink_links=4),
        CardModel("L4", "NVIDIA L4", 0x27B810DE, 23034, (8, 9), "ada"),
        CardModel("RTX-4070-LAPTOP", "NVIDIA GeForce RTX 4070 Laptop GPU", 0x282010DE, 8188,
                  (8, 9), "ada", ecc=False),
    )
}  # fmt: skip


def card_by_pci_id(pci_device_id: int) -> CardModel | None:
    """The card with this PCI device+vendor id (e.g. 0x20B010DE), or None."""
    return next((c for c in CARDS.values() if c.pci_device_id == pci_device_id), None)
