"""read_inventory: a node's GPUs, MIG devices, topology and processes as one frozen Inventory.

A GPU that stops answering (NVML_ERROR_GPU_IS_LOST or UNKNOWN) is a fact, not a failure: it
appears with `lost=True` and the reason, keeping what NVML still answers (UUID, name, PCI, minor)
or, when given, what the previous inventory knew about that index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pynvml

from sharing.devices import ComputeMode, Gpu, Inventory, MigDevice
from sharing.errors import GpuLost, NvmlError, NvmlNotSupported
from sharing.nvml.adapter import Nvml
from sharing.nvml.profiles import MIB, canonical_name

_COMPUTE_MODES = {
    pynvml.NVML_COMPUTEMODE_DEFAULT: ComputeMode.DEFAULT,
    pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD: ComputeMode.EXCLUSIVE_THREAD,
    pynvml.NVML_COMPUTEMODE_PROHIBITED: ComputeMode.PROHIBITED,
    pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS: ComputeMode.EXCLUSIVE_PROCESS,
}
PCIE_SCORES = {
    pynvml.NVML_TOPOLOGY_INTERNAL: 60,
    pynvml.NVML_TOPOLOGY_SINGLE: 50,
    pynvml.NVML_TOPOLOGY_MULTIPLE: 40,
    pynvml.NVML_TOPOLOGY_HOSTBRIDGE: 30,
    pynvml.NVML_TOPOLOGY_NODE: 20,
    pynvml.NVML_TOPOLOGY_SYSTEM: 10,
}
NVLINK_SCORE = 100


def read_inventory(
    nvml: Nvml,
    previous: Inventory | None = None,
    *,
    numa_reader: Callable[[str], int | None] | None = None,
) -> Inventory:
    """Read every GPU, MIG device, link and process; lost GPUs become `lost=True` entries.

    NUMA nodes come from `numa_reader(pci_bus_id)`, by default the adapter's host files (sysfs
    under `/`, or the simulated node's `host/`). `previous` supplies what a lost GPU no longer
    answers.
    """
    numa = numa_reader if numa_reader is not None else nvml.host.numa_node
    handles: list[Any] = []
    gpus: list[Gpu] = []
    for index in range(nvml.device_count()):
        known = _known(previous, index)
        try:
            handle = nvml.handle(index)
        except GpuLost as err:
            handles.append(None)
            gpus.append(_lost(index, str(err), known, {}))
            continue
        handles.append(handle)
        gpus.append(_read_gpu(nvml, index, handle, known, numa))
    nvlinks, scores = _topology(nvml, gpus, handles)
    return Inventory(
        gpus=tuple(gpus),
        link_scores=scores,
        nvlink_counts=nvlinks,
        driver_version=nvml.call("nvmlSystemGetDriverVersion"),
        cuda_driver_version=int(nvml.call("nvmlSystemGetCudaDriverVersion")),
    )


def _known(previous: Inventory | None, index: int) -> Gpu | None:
    if previous is None:
        return None
    return next((g for g in previous.gpus if g.index == index), None)


def _lost(index: int, reason: str, known: Gpu | None, static: dict[str, Any]) -> Gpu:
    if known is not None:
        base = dataclasses.replace(known, processes=(), lost=True, lost_reason=reason)
        mig = tuple(dataclasses.replace(m, processes=()) for m in known.mig_devices)
        return dataclasses.replace(base, mig_devices=mig, **static)
    fields = {"uuid": "", "name": "", "pci_bus_id": "", "pci_device_id": 0, "minor": -1}
    fields.update(static)
    return Gpu(
        index=index,
        memory_mib=0,
        numa_node=None,
        cuda_compute_capability=(0, 0),
        lost=True,
        lost_reason=reason,
        **fields,
    )


def _read_static(nvml: Nvml, handle: Any) -> tuple[dict[str, Any], bool]:
    """What the driver answers even for a lost GPU, and whether the GPU answered all of it."""
    static: dict[str, Any] = {}
    calls = (
        ("uuid", "nvmlDeviceGetUUID"),
        ("name", "nvmlDeviceGetName"),
        ("pci", "nvmlDeviceGetPciInfo"),
        ("minor", "nvmlDeviceGetMinorNumber"),
    )
    for key, function in calls:
        try:
            static[key] = nvml.call(function, handle)
        except NvmlNotSupported:
            static[key] = -1 if key == "minor" else ""
        except GpuLost:
            break
    complete = len(static) == len(calls)
    pci = static.pop("pci", None)
    if pci:
        static["pci_bus_id"] = _text(pci.busId)
        static["pci_device_id"] = int(pci.pciDeviceId)
    return static, complete


def _read_gpu(
    nvml: Nvml, index: int, handle: Any, known: Gpu | None, numa: Callable[[str], int | None]
) -> Gpu:
    static, complete = _read_static(nvml, handle)
    if not complete:
        return _lost(index, "GPU is lost: it does not answer NVML queries", known, static)
    try:
        memory_mib = int(nvml.call("nvmlDeviceGetMemoryInfo", handle).total) // MIB
        major, minor_cc = nvml.call("nvmlDeviceGetCudaComputeCapability", handle)
        capable, current, pending = _mig_mode(nvml, handle)
        mig_devices = ()
        if current:
            mig_devices = _read_mig_devices(nvml, index, handle, static, memory_mib)
        return Gpu(
            index=index,
            memory_mib=memory_mib,
            numa_node=numa(static["pci_bus_id"]),
            cuda_compute_capability=(int(major), int(minor_cc)),
            mig_capable=capable,
            mig_enabled=current,
            mig_pending=pending,
            compute_mode=_compute_mode(nvml, handle),
            mig_devices=mig_devices,
            processes=_pids(nvml, handle),
            **static,
        )
    except GpuLost as err:
        return _lost(index, str(err), known, static)


def _mig_mode(nvml: Nvml, handle: Any) -> tuple[bool, bool, bool]:
    try:
        current, pending = nvml.call("nvmlDeviceGetMigMode", handle)
    except NvmlNotSupported:
        return False, False, False
    return True, bool(current), bool(pending)


def _compute_mode(nvml: Nvml, handle: Any) -> ComputeMode:
    try:
        return _COMPUTE_MODES[nvml.call("nvmlDeviceGetComputeMode", handle)]
    except NvmlNotSupported:
        return ComputeMode.DEFAULT


def _pids(nvml: Nvml, handle: Any) -> tuple[int, ...]:
    """Compute process ids; () where the driver does not list them (unsupported, no permission)."""
    try:
        procs = nvml.call("nvmlDeviceGetComputeRunningProcesses", handle)
    except NvmlNotSupported:
        return ()
    except NvmlError as err:
        if err.code == pynvml.NVML_ERROR_NO_PERMISSION:
            return ()
        raise
    return tuple(sorted(int(p.pid) for p in procs))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _profile_indices(nvml: Nvml, handle: Any) -> dict[int, int]:
    """GI profile id -> NVML profile index, for the profiles this GPU offers."""
    found = {}
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
        except NvmlError as err:
            if isinstance(err, GpuLost):
                raise
            continue
        found[int(info.id)] = index
    return found


def _read_mig_devices(
    nvml: Nvml, index: int, handle: Any, static: dict[str, Any], total_mib: int
) -> tuple[MigDevice, ...]:
    profile_index = _profile_indices(nvml, handle)
    devices = []
    for mig_index in range(nvml.call("nvmlDeviceGetMaxMigDeviceCount", handle)):
        try:
            mig = nvml.call("nvmlDeviceGetMigDeviceHandleByIndex", handle, mig_index)
        except NvmlError as err:
            if err.code == pynvml.NVML_ERROR_NOT_FOUND:
                continue
            raise
        devices.append(
            _read_mig_device(nvml, index, handle, mig, mig_index, static, total_mib, profile_index)
        )
    return tuple(devices)


def _read_mig_device(
    nvml: Nvml,
    index: int,
    parent: Any,
    mig: Any,
    mig_index: int,
    static: dict[str, Any],
    total_mib: int,
    profile_index: dict[int, int],
) -> MigDevice:
    gi_id = int(nvml.call("nvmlDeviceGetGpuInstanceId", mig))
    ci_id = int(nvml.call("nvmlDeviceGetComputeInstanceId", mig))
    info = nvml.call(
        "nvmlGpuInstanceGetInfo", nvml.call("nvmlDeviceGetGpuInstanceById", parent, gi_id)
    )
    attrs = nvml.call("nvmlDeviceGetAttributes", mig)
    profile = canonical_name(
        int(attrs.gpuInstanceSliceCount),
        int(attrs.memorySizeMB),
        total_mib,
        profile_index.get(int(info.profileId), -1),
        int(attrs.computeInstanceSliceCount),
    )
    minor = static["minor"]
    return MigDevice(
        uuid=nvml.call("nvmlDeviceGetUUID", mig),
        parent_uuid=static["uuid"],
        parent_index=index,
        index=mig_index,
        gi_id=gi_id,
        ci_id=ci_id,
        profile=profile,
        placement_start=int(info.placement.start),
        placement_size=int(info.placement.size),
        memory_mib=int(attrs.memorySizeMB),
        multiprocessor_count=int(attrs.multiprocessorCount),
        gi_cap_minor=nvml.host.gi_minor(minor, gi_id),
        ci_cap_minor=nvml.host.ci_minor(minor, gi_id, ci_id),
        processes=_pids(nvml, mig),
    )


def _nvlink_remotes(nvml: Nvml, handle: Any) -> list[str]:
    """PCI bus ids at the far end of each active NVLink (upper case); [] if the GPU is lost."""
    try:
        return _active_links(nvml, handle)
    except GpuLost:
        return []


def _active_links(nvml: Nvml, handle: Any) -> list[str]:
    remotes = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active = nvml.call("nvmlDeviceGetNvLinkState", handle, link)
        except NvmlNotSupported:
            break
        except NvmlError as err:
            if err.code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                break
            raise
        if not active:
            continue
        try:
            pci = nvml.call("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
        except NvmlNotSupported:
            continue
        remotes.append(_text(pci.busId).upper())
    return remotes


def _nvlink_count(a: list[str], b: list[str], bus_a: str, bus_b: str, gpu_buses: set[str]) -> int:
    """Links between two GPUs: direct links plus links they share through each NVSwitch."""
    direct = a.count(bus_b)
    switched = sum(min(a.count(s), b.count(s)) for s in set(a) - gpu_buses)
    return direct + switched


def _pcie_score(nvml: Nvml, a: Any, b: Any) -> int:
    try:
        level = nvml.call("nvmlDeviceGetTopologyCommonAncestor", a, b)
    except (GpuLost, NvmlNotSupported):
        return 0
    return PCIE_SCORES.get(level, 0)


def _topology(
    nvml: Nvml, gpus: list[Gpu], handles: list[Any]
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    n = len(gpus)
    alive = [h is not None and not g.lost for g, h in zip(gpus, handles, strict=True)]
    remotes = [_nvlink_remotes(nvml, h) if ok else [] for h, ok in zip(handles, alive, strict=True)]
    buses = [g.pci_bus_id.upper() for g in gpus]
    counts = [[0] * n for _ in range(n)]
    scores = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if not (alive[i] and alive[j]):
                continue
            links = _nvlink_count(remotes[i], remotes[j], buses[i], buses[j], set(buses))
            counts[i][j] = counts[j][i] = links
            score = NVLINK_SCORE * links if links else _pcie_score(nvml, handles[i], handles[j])
            scores[i][j] = scores[j][i] = score
    return tuple(map(tuple, counts)), tuple(map(tuple, scores))
