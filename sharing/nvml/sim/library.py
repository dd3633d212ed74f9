"""The simulated NVML library object: pynvml's functions, signatures, return shapes and errors.

`SimNvml(state_dir)` is what `sharing.nvml.load_library` returns for a simulated node. It is
passed to the adapter in place of the `pynvml` module; calls return real pynvml ctypes structures
and raise real `pynvml.NVMLError_*` exceptions. Device queries live here, MIG calls in
`library_mig`, events in `library_events`.
"""

from __future__ import annotations

import pynvml

from sharing.nvml.profiles import MIB, canonical_name
from sharing.nvml.sim import handles, recovery
from sharing.nvml.sim.base import SimBase, Target
from sharing.nvml.sim.engine import fail
from sharing.nvml.sim.library_events import SimEvents
from sharing.nvml.sim.library_mig import SimMig
from sharing.nvml.sim.state import NO_ID


class SimNvml(SimEvents, SimMig, SimBase):
    """A pynvml-shaped library over one simulated node's state directory."""

    NVMLError = pynvml.NVMLError
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_NVLINK_MAX_LINKS = pynvml.NVML_NVLINK_MAX_LINKS
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_GPU_INSTANCE_PROFILE_COUNT = pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED = pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError
    nvmlEventTypeSingleBitEccError = pynvml.nvmlEventTypeSingleBitEccError
    nvmlEventTypeDoubleBitEccError = pynvml.nvmlEventTypeDoubleBitEccError
    NVML_TOPOLOGY_INTERNAL = pynvml.NVML_TOPOLOGY_INTERNAL
    NVML_TOPOLOGY_SINGLE = pynvml.NVML_TOPOLOGY_SINGLE
    NVML_TOPOLOGY_MULTIPLE = pynvml.NVML_TOPOLOGY_MULTIPLE
    NVML_TOPOLOGY_HOSTBRIDGE = pynvml.NVML_TOPOLOGY_HOSTBRIDGE
    NVML_TOPOLOGY_NODE = pynvml.NVML_TOPOLOGY_NODE
    NVML_TOPOLOGY_SYSTEM = pynvml.NVML_TOPOLOGY_SYSTEM

    # -- lifecycle and system ------------------------------------------------------------------
    def nvmlInit(self) -> None:
        """Initialise (refcounted); fails with the node's `init_error` when it has one."""
        code = self.spec.init_error_code()
        if code is not None:
            fail(code)
        self._init_count += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        """Same as nvmlInit."""
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        """Drop one init reference."""
        if self._init_count == 0:
            fail(pynvml.NVML_ERROR_UNINITIALIZED)
        self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        """Driver version string."""
        self._state()
        return self.spec.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        """CUDA driver version as an int (12040 = 12.4)."""
        self._state()
        return self.spec.cuda_driver_version

    # -- handles -------------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        """Number of GPUs."""
        return len(self._state()["gpus"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        """Handle of GPU `index`."""
        if not 0 <= index < len(self._state()["gpus"]):
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handles.device(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> object:
        """Handle of the GPU or MIG device with this UUID."""
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        state = self._state()
        for index, gpu in enumerate(state["gpus"]):
            if self._uuids[index] == text:
                return handles.device(index)
            for gi in gpu["gis"]:
                for ci in gi["cis"]:
                    if self._mig_uuid(index, gi["id"], ci["id"]) == text:
                        return handles.device(index, gi["id"], ci["id"])
        fail(pynvml.NVML_ERROR_NOT_FOUND)
        raise AssertionError  # unreachable

    def nvmlDeviceGetIndex(self, handle: object) -> int:
        """NVML index of a GPU."""
        return self._gpu_only(handle, alive=False).index

    # -- static facts (answered for a lost GPU too: the driver keeps them) ---------------------
    def nvmlDeviceGetUUID(self, handle: object) -> str:
        """UUID of a GPU or MIG device."""
        t = self._device(handle, alive=False)
        if t.is_mig:
            return self._mig_uuid(t.index, t.gi["id"], t.ci["id"])
        return self._uuids[t.index]

    def nvmlDeviceGetName(self, handle: object) -> str:
        """Product name (`<name> MIG [<C>c.]<profile>` for a MIG device)."""
        t = self._device(handle, alive=False)
        if not t.is_mig:
            return t.card.name
        p = t.card.profile_by_id(t.gi["profile_id"])
        name = canonical_name(p.slices, p.memory_mib, t.card.memory_mib, p.index, t.ci["slices"])
        return f"{t.card.name} MIG {name}"

    def nvmlDeviceGetPciInfo(self, handle: object) -> pynvml.nvmlPciInfo_t:
        """PCI info (a MIG device reports its parent's)."""
        t = self._device(handle, alive=False)
        bus_id = self.spec.gpus[t.index].bus_id
        return _pci_info(bus_id, t.card.pci_device_id)

    def nvmlDeviceGetPciInfo_v3(self, handle: object) -> pynvml.nvmlPciInfo_t:
        """Same as nvmlDeviceGetPciInfo."""
        return self.nvmlDeviceGetPciInfo(handle)

    def nvmlDeviceGetMinorNumber(self, handle: object) -> int:
        """Minor number of /dev/nvidia<minor>."""
        return self.spec.minor(self._gpu_only(handle, alive=False).index)

    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]:
        """(major, minor)."""
        return self._device(handle).card.compute_capability

    # -- dynamic state -------------------------------------------------------------------------
    def nvmlDeviceGetMemoryInfo(self, handle: object, version: int | None = None) -> object:
        """Memory totals in bytes (a MIG device: its GI's memory)."""
        t = self._device(handle)
        total_mib = t.card.memory_mib
        if t.is_mig:
            total_mib = t.card.profile_by_id(t.gi["profile_id"]).memory_mib
        used = sum(p["used_mib"] for p in _procs(t)) * MIB
        total = total_mib * MIB
        if version:
            return pynvml.c_nvmlMemory_v2_t(
                version=version, total=total, reserved=0, free=total - used, used=used
            )
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[object]:
        """Compute processes on a GPU (all of them) or on one MIG device."""
        out = []
        for p in _procs(self._device(handle)):
            info = pynvml.c_nvmlProcessInfo_v2_t(
                pid=p["pid"],
                usedGpuMemory=p["used_mib"] * MIB,
                gpuInstanceId=NO_ID if p["gi"] is None else p["gi"],
                computeInstanceId=NO_ID if p["ci"] is None else p["ci"],
            )
            out.append(pynvml.nvmlStructToFriendlyObject(info))
        return out

    nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses

    def nvmlDeviceGetComputeMode(self, handle: object) -> int:
        """NVML_COMPUTEMODE_* of a GPU."""
        return self._gpu_only(handle).gpu["compute_mode"]

    def nvmlDeviceSetComputeMode(self, handle: object, mode: int) -> None:
        """Set the compute mode (EXCLUSIVE_THREAD is not supported, as on current drivers)."""
        if mode == pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if mode not in (
            pynvml.NVML_COMPUTEMODE_DEFAULT,
            pynvml.NVML_COMPUTEMODE_PROHIBITED,
            pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
        ):
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with self._mutating() as state:
            t = self._resolve(state, handle)
            if t.is_mig:
                fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
            t.gpu["compute_mode"] = mode

    def nvmlDeviceGetFieldValues(self, handle: object, fieldIds: list) -> object:
        """A ctypes array of c_nvmlFieldValue_t; each unsupported field answers NOT_SUPPORTED."""
        t = self._device(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        for value, field in zip(values, fieldIds, strict=True):
            recovery.set_field_id(value, field)
            recovery.fill_field_value(
                value, t.gpu, supported=self.spec.recovery_action_field, is_mig=t.is_mig
            )
        return values

    # -- topology ------------------------------------------------------------------------------
    def nvmlDeviceGetTopologyCommonAncestor(self, device1: object, device2: object) -> int:
        """NVML_TOPOLOGY_* relation of two GPUs from their board, PCIe path and NUMA node."""
        a = self._gpu_only(device1)
        b = self._gpu_only(device2)
        return _common_ancestor(self.spec.gpus[a.index], self.spec.gpus[b.index])

    def nvmlDeviceGetNvLinkState(self, device: object, link: int) -> int:
        """1 when the link is active."""
        return int(self._nvlink_remote(device, link) is not None)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: object, link: int) -> pynvml.nvmlPciInfo_t:
        """PCI info of the link's far end (a GPU or an NVSwitch)."""
        remote = self._nvlink_remote(device, link)
        if remote is None:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        peer = next((g for g in self.spec.gpus if g.bus_id == remote), None)
        device_id = self._cards[self.spec.gpus.index(peer)].pci_device_id if peer else 0x1AF110DE
        return _pci_info(remote, device_id)

    def _nvlink_remote(self, device: object, link: int) -> str | None:
        t = self._gpu_only(device)
        links = self._links[t.index]
        if not links:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < len(links):
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]


def _procs(t: Target) -> list[dict]:
    if not t.is_mig:
        return t.gpu["procs"]
    return [p for p in t.gpu["procs"] if p["gi"] == t.gi["id"] and p["ci"] == t.ci["id"]]


def _pci_info(bus_id: str, device_id: int) -> pynvml.nvmlPciInfo_t:
    domain, bus, rest = bus_id.split(":")
    info = pynvml.nvmlPciInfo_t()
    info.busIdLegacy = f"{int(domain, 16):04X}:{bus}:{rest}".encode()
    info.busId = bus_id.encode()
    info.domain = int(domain, 16)
    info.bus = int(bus, 16)
    info.device = int(rest.split(".")[0], 16)
    info.pciDeviceId = device_id
    info.pciSubSystemId = ((device_id >> 16) ^ 0x1000) << 16 | 0x10DE
    return info


def _common_ancestor(a: object, b: object) -> int:
    if a.board is not None and a.board == b.board:
        return pynvml.NVML_TOPOLOGY_INTERNAL
    common = 0
    for x, y in zip(a.pcie_path, b.pcie_path, strict=False):
        if x != y:
            break
        common += 1
    if common >= 2 and common == len(a.pcie_path) == len(b.pcie_path):
        return pynvml.NVML_TOPOLOGY_SINGLE
    if common >= 2:
        return pynvml.NVML_TOPOLOGY_MULTIPLE
    if common == 1:
        return pynvml.NVML_TOPOLOGY_HOSTBRIDGE
    if a.numa_node is not None and a.numa_node == b.numa_node:
        return pynvml.NVML_TOPOLOGY_NODE
    return pynvml.NVML_TOPOLOGY_SYSTEM
