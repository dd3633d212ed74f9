"""MIG calls of the simulated NVML: mode, profiles, placements, GPU and compute instances."""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml

from sharing.nvml.sim import engine, handles
from sharing.nvml.sim.base import SimBase
from sharing.nvml.sim.engine import fail
from sharing.nvml.sim.state import State, append_event


def _fill(array_ref: object, count_ref: object, items: list[Any]) -> None:
    """Write items into a caller-allocated ctypes array (if any) and the count into count_ref."""
    count = handles.deref(count_ref)
    array = handles.deref(array_ref)
    if array is not None:
        if isinstance(array, ctypes.Array) and len(array) < len(items):
            count.value = len(items)
            fail(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for i, item in enumerate(items):
            array[i] = item
    count.value = len(items)


class SimMig(SimBase):
    """MIG part of the simulated NVML (rules in `engine`)."""

    def nvmlDeviceGetMigMode(self, device: object) -> list[int]:
        """[current, pending] MIG mode."""
        t = self._gpu_only(device)
        if not t.card.mig_capable:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [t.gpu["mig_current"], t.gpu["mig_pending"]]

    def nvmlDeviceSetMigMode(self, device: object, mode: int) -> int:
        """Request a MIG mode; returns the activation status (engine docstring has the model)."""
        with self._mutating() as state:
            t = self._resolve(state, device)
            if t.is_mig:
                fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
            status = engine.set_mig_mode(t.card, t.gpu, mode)
            _mig_changed(state, t.index)
        return status

    def nvmlDeviceGetMaxMigDeviceCount(self, device: object) -> int:
        """Most MIG devices the GPU can hold."""
        t = self._gpu_only(device)
        if not t.card.mig_capable:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return max(p.max_count for p in t.card.profiles if p.slices == 1 and p.size == 1)

    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, device: object, profile: int, version: int = 2
    ) -> object:
        """Profile info for an NVML profile index (NOT_SUPPORTED when the card lacks it)."""
        t = self._gpu_only(device)
        if not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        p = t.card.profile_by_index(profile)
        if p is None:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if version == 2:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            info.name = f"MIG {p.name}".encode()
        elif version == 1:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_t()
        else:
            fail(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        info.id, info.sliceCount, info.instanceCount = p.id, p.slices, p.max_count
        info.multiprocessorCount, info.memorySizeMB = p.multiprocessor_count, p.memory_mib
        info.copyEngineCount = info.decoderCount = info.jpegCount = info.ofaCount = p.slices
        return info

    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self, device: object, profileId: int, placementsRef: object, countRef: object
    ) -> int:
        """Every placement the profile allows, occupied or not (as NVML documents)."""
        t = self._gpu_only(device)
        p = t.card.profile_by_id(profileId) if t.card.mig_capable else None
        if p is None:
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        items = [pynvml.c_nvmlGpuInstancePlacement_t(s, p.size) for s in p.starts]
        _fill(placementsRef, countRef, items)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceCreateGpuInstance(self, device: object, profileId: int) -> object:
        """Create a GI where the driver chooses (highest free allowed start)."""
        return self._create_gi(device, profileId, None, None)

    def nvmlDeviceCreateGpuInstanceWithPlacement(
        self, device: object, profileId: int, placement: object
    ) -> object:
        """Create a GI at an explicit placement (a struct, a pointer to one, or byref of one)."""
        value = handles.deref(placement)
        value = getattr(value, "contents", value)
        return self._create_gi(device, profileId, value.start, value.size)

    def _create_gi(
        self, device: object, profile_id: int, start: int | None, size: int | None
    ) -> object:
        with self._mutating() as state:
            t = self._resolve(state, device)
            if t.is_mig:
                fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
            gi = engine.create_gi(t.card, t.gpu, profile_id, start, size)
            _mig_changed(state, t.index)
        return handles.gpu_instance(t.index, gi["id"])

    def nvmlDeviceGetGpuInstances(
        self, device: object, profileId: int, gpuInstancesRef: object, countRef: object
    ) -> int:
        """The GIs of one profile."""
        t = self._gpu_only(device)
        engine.require_mig(t.card, t.gpu)
        found = [
            handles.gpu_instance(t.index, gi["id"])
            for gi in t.gpu["gis"]
            if gi["profile_id"] == profileId
        ]
        _fill(gpuInstancesRef, countRef, found)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetGpuInstanceById(self, device: object, gpuInstanceId: int) -> object:
        """Handle of the GI with this id."""
        t = self._gpu_only(device)
        engine.require_mig(t.card, t.gpu)
        gi = engine.find_gi(t.gpu, gpuInstanceId)
        return handles.gpu_instance(t.index, gi["id"])

    def nvmlGpuInstanceGetInfo(self, gpuInstance: object) -> pynvml.c_nvmlGpuInstanceInfo_t:
        """GI info: parent device, id, profile id, placement."""
        index, gi = self._gi_of(self._state(), gpuInstance)
        profile = self._cards[index].profile_by_id(gi["profile_id"])
        placement = pynvml.c_nvmlGpuInstancePlacement_t(gi["start"], profile.size)
        return pynvml.c_nvmlGpuInstanceInfo_t(
            handles.device(index), gi["id"], gi["profile_id"], placement
        )

    def nvmlGpuInstanceDestroy(self, gpuInstance: object) -> int:
        """Destroy a GI (IN_USE with CIs or processes)."""
        with self._mutating() as state:
            index, gi = self._gi_of(state, gpuInstance)
            engine.destroy_gi(self._cards[index], state["gpus"][index], gi["id"])
            _mig_changed(state, index)
        return pynvml.NVML_SUCCESS

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, device: object, profile: int, engProfile: int, version: int = 2
    ) -> object:
        """CI profile info inside a GI (the first argument is the GI handle, as in pynvml)."""
        index, gi = self._gi_of(self._state(), device)
        offered = engine.ci_profiles(self._cards[index], gi)
        if (
            engProfile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
            or profile not in offered
        ):
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        slices, count, sms = offered[profile]
        if version == 2:
            info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
            info.name = f"MIG {slices}c".encode()
        elif version == 1:
            info = pynvml.c_nvmlComputeInstanceProfileInfo_t()
        else:
            fail(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        info.id, info.sliceCount, info.instanceCount = profile, slices, count
        info.multiprocessorCount = sms
        return info

    def nvmlGpuInstanceCreateComputeInstance(self, gpuInstance: object, profileId: int) -> object:
        """Create a CI of a CI profile id in a GI."""
        with self._mutating() as state:
            index, gi = self._gi_of(state, gpuInstance)
            ci = engine.create_ci(self._cards[index], state["gpus"][index], gi["id"], profileId)
            _mig_changed(state, index)
        return handles.compute_instance(index, gi["id"], ci["id"])

    def nvmlGpuInstanceGetComputeInstances(
        self, gpuInstance: object, profileId: int, computeInstancesRef: object, countRef: object
    ) -> int:
        """The CIs of one CI profile in a GI."""
        index, gi = self._gi_of(self._state(), gpuInstance)
        found = [
            handles.compute_instance(index, gi["id"], ci["id"])
            for ci in gi["cis"]
            if ci["profile_id"] == profileId
        ]
        _fill(computeInstancesRef, countRef, found)
        return pynvml.NVML_SUCCESS

    def nvmlGpuInstanceGetComputeInstanceById(
        self, gpuInstance: object, computeInstanceId: int
    ) -> object:
        """Handle of the CI with this id in a GI."""
        index, gi = self._gi_of(self._state(), gpuInstance)
        ci = engine.find_ci(gi, computeInstanceId)
        return handles.compute_instance(index, gi["id"], ci["id"])

    def _ci_of(self, state: State, handle: object) -> tuple[int, dict, dict]:
        ref = handles.decode_compute_instance(handle)
        index, gi = self._gi_of(state, handles.gpu_instance(ref.gpu, ref.gi))
        ci = next((c for c in gi["cis"] if c["id"] == ref.ci), None)
        if ci is None:
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index, gi, ci

    def nvmlComputeInstanceGetInfo(self, computeInstance: object) -> object:
        """CI info: device, GI handle, id, profile id, placement."""
        index, gi, ci = self._ci_of(self._state(), computeInstance)
        placement = pynvml.c_nvmlComputeInstancePlacement_t(ci["start"], ci["slices"])
        return pynvml.c_nvmlComputeInstanceInfo_t(
            handles.device(index),
            handles.gpu_instance(index, gi["id"]),
            ci["id"],
            ci["profile_id"],
            placement,
        )

    nvmlComputeInstanceGetInfo_v2 = nvmlComputeInstanceGetInfo

    def nvmlComputeInstanceDestroy(self, computeInstance: object) -> int:
        """Destroy a CI (IN_USE with processes)."""
        with self._mutating() as state:
            index, gi, ci = self._ci_of(state, computeInstance)
            engine.destroy_ci(self._cards[index], state["gpus"][index], gi["id"], ci["id"])
            _mig_changed(state, index)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: object, index: int) -> object:
        """Handle of the index-th MIG device (NOT_FOUND past the last one)."""
        t = self._gpu_only(device)
        engine.require_mig(t.card, t.gpu)
        if not 0 <= index < self.nvmlDeviceGetMaxMigDeviceCount(device):
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        pairs = engine.mig_devices(t.gpu)
        if index >= len(pairs):
            fail(pynvml.NVML_ERROR_NOT_FOUND)
        gi, ci = pairs[index]
        return handles.device(t.index, gi["id"], ci["id"])

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: object) -> object:
        """The parent GPU of a MIG device handle."""
        t = self._device(migDevice)
        if not t.is_mig:
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handles.device(t.index)

    def nvmlDeviceGetAttributes(self, device: object) -> pynvml.c_nvmlDeviceAttributes:
        """SMs, slice counts and memory of a MIG device (of the whole GPU for a GPU handle)."""
        t = self._device(device)
        attrs = pynvml.c_nvmlDeviceAttributes()
        if not t.is_mig:
            attrs.memorySizeMB = t.card.memory_mib
            attrs.multiprocessorCount = max(
                (p.multiprocessor_count for p in t.card.profiles), default=0
            )
            return attrs
        profile = t.card.profile_by_id(t.gi["profile_id"])
        _, _, sms = engine.ci_profiles(t.card, t.gi)[t.ci["profile_id"]]
        attrs.multiprocessorCount = sms
        attrs.gpuInstanceSliceCount = profile.slices
        attrs.computeInstanceSliceCount = t.ci["slices"]
        attrs.memorySizeMB = profile.memory_mib
        return attrs

    nvmlDeviceGetAttributes_v2 = nvmlDeviceGetAttributes

    def nvmlDeviceIsMigDeviceHandle(self, device: object) -> ctypes.c_uint:
        """c_uint(1) for a MIG device handle (pynvml returns the c_uint itself)."""
        return ctypes.c_uint(int(self._device(device, alive=False).is_mig))

    def nvmlDeviceGetGpuInstanceId(self, device: object) -> int:
        """GI id of a MIG device."""
        t = self._device(device)
        if not t.is_mig:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return t.gi["id"]

    def nvmlDeviceGetComputeInstanceId(self, device: object) -> int:
        """CI id of a MIG device."""
        t = self._device(device)
        if not t.is_mig:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return t.ci["id"]


def _mig_changed(state: State, index: int) -> None:
    append_event(state, index, pynvml.nvmlEventMigConfigChange, 0, None, None)
