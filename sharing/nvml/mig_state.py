"""Reading each GPU's MIG state for the planner: mode, profiles, GPU and compute instances.

Unlike the inventory (which lists MIG devices, GI+CI pairs), this lists every GPU instance with
all its compute instances, so a GPU instance left without its compute instance by an interrupted
apply is seen and put right.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml

from sharing.errors import GpuLost, NvmlError, NvmlNotSupported
from sharing.mig.layout import ComputeInstanceState, GpuInstanceState, GpuMigState
from sharing.nvml.adapter import Nvml
from sharing.nvml.mig import gpu_profiles
from sharing.nvml.profiles import CI_PROFILE_INDEX_BY_SLICES, MigProfile, card_by_pci_id

# Ampere (compute capability 8.x) applies a MIG mode change through a GPU reset (facts §6.3).
_FIRST_ARCH_WITHOUT_RESET = 9


def read_node_mig_state(nvml: Nvml) -> tuple[GpuMigState, ...]:
    """Every GPU's MIG state, by index (a lost GPU has `lost_reason` set)."""
    return tuple(read_gpu_mig_state(nvml, i) for i in range(nvml.device_count()))


def node_identity(nvml: Nvml) -> tuple[str, ...]:
    """The node's identity for journals: its GPU UUIDs by index."""
    return tuple(
        str(nvml.call("nvmlDeviceGetUUID", nvml.handle(i))) for i in range(nvml.device_count())
    )


def read_gpu_mig_state(nvml: Nvml, index: int) -> GpuMigState:
    """One GPU's MIG state."""
    try:
        handle = nvml.handle(index)
        uuid = str(nvml.call("nvmlDeviceGetUUID", handle))
        name = str(nvml.call("nvmlDeviceGetName", handle))
    except GpuLost as err:
        return GpuMigState(index, "", "", lost_reason=str(err))
    try:
        return _read(nvml, index, handle, uuid, name)
    except GpuLost as err:
        return GpuMigState(index, uuid, name, lost_reason=str(err))


def _read(nvml: Nvml, index: int, handle: Any, uuid: str, name: str) -> GpuMigState:
    pci = nvml.call("nvmlDeviceGetPciInfo", handle)
    base = GpuMigState(
        index, uuid, name, int(pci.pciDeviceId), int(pci.pciSubSystemId),
        processes=_pids(nvml, handle),
    )  # fmt: skip
    try:
        current, pending = nvml.call("nvmlDeviceGetMigMode", handle)
    except NvmlNotSupported:
        return base
    major, _ = nvml.call("nvmlDeviceGetCudaComputeCapability", handle)
    profiles = _profiles(nvml, index, bool(current), base.pci_device_id)
    instances = _instances(nvml, handle, profiles) if current else ()
    return GpuMigState(
        index, uuid, name, base.pci_device_id, base.pci_subsystem_id,
        mig_capable=True, mig_current=bool(current), mig_pending=bool(pending),
        mode_change_needs_reset=int(major) < _FIRST_ARCH_WITHOUT_RESET,
        profiles=profiles, instances=instances, processes=base.processes,
    )  # fmt: skip


def _profiles(
    nvml: Nvml, index: int, mig_on: bool, pci_device_id: int
) -> tuple[MigProfile, ...]:
    """The GPU's profiles from NVML; with MIG off, a driver that will not list placements yet
    falls back to the known card table for this PCI id (facts §6.3)."""
    try:
        return gpu_profiles(nvml, index)
    except NvmlNotSupported:
        card = None if mig_on else card_by_pci_id(pci_device_id)
        if card is None:
            raise
        return card.profiles


def _pids(nvml: Nvml, handle: Any) -> tuple[int, ...]:
    try:
        procs = nvml.call("nvmlDeviceGetComputeRunningProcesses", handle)
    except NvmlNotSupported:
        return ()
    return tuple(sorted({int(p.pid) for p in procs}))


def _instances(
    nvml: Nvml, handle: Any, profiles: tuple[MigProfile, ...]
) -> tuple[GpuInstanceState, ...]:
    found = []
    for profile in profiles:
        count = ctypes.c_uint(0)
        array = (pynvml.c_nvmlGpuInstance_t * max(profile.max_count, 1))()
        nvml.call("nvmlDeviceGetGpuInstances", handle, profile.id, array, ctypes.byref(count))
        for gi in array[: count.value]:
            info = nvml.call("nvmlGpuInstanceGetInfo", gi)
            found.append(
                GpuInstanceState(
                    int(info.id), profile.name, profile.slices, int(info.placement.start),
                    int(info.placement.size), _compute_instances(nvml, gi, profile.slices),
                )
            )  # fmt: skip
    return tuple(sorted(found, key=lambda g: g.start))


def _compute_instances(nvml: Nvml, gi: Any, gi_slices: int) -> tuple[ComputeInstanceState, ...]:
    """Every compute instance of a GI (CI profiles up to the GI's size)."""
    found = []
    for slices, ci_index in sorted(CI_PROFILE_INDEX_BY_SLICES.items()):
        if slices > gi_slices:
            break
        try:
            info = nvml.call(
                "nvmlGpuInstanceGetComputeInstanceProfileInfo",
                gi, ci_index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
            )  # fmt: skip
        except NvmlNotSupported:
            continue
        except NvmlError as err:
            if err.code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                continue
            raise
        count = ctypes.c_uint(0)
        array = (pynvml.c_nvmlComputeInstance_t * max(int(info.instanceCount), 1))()
        nvml.call("nvmlGpuInstanceGetComputeInstances", gi, int(info.id), array,
                  ctypes.byref(count))  # fmt: skip
        for ci in array[: count.value]:
            ci_id = int(nvml.call("nvmlComputeInstanceGetInfo", ci).id)
            found.append(ComputeInstanceState(ci_id, int(info.sliceCount)))
    return tuple(sorted(found, key=lambda c: c.ci_id))
