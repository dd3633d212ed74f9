"""MIG operations over the adapter: mode, profiles, GPU/compute instances, compute mode.

Each operation asks NVML (real or simulated) and turns its refusals into `MigError` subclasses
whose messages name the GPU, the profile, the placement and the reason.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import pynvml

from sharing.devices import ComputeMode
from sharing.errors import MigError, NvmlError, NvmlNotSupported
from sharing.nvml.adapter import Nvml, code_name
from sharing.nvml.profiles import CI_PROFILE_INDEX_BY_SLICES, MIB, MigProfile, canonical_name


class MigRefused(MigError):
    """NVML refused a MIG operation; `code` is the NVML return code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MigInUse(MigRefused):
    """The instance still has compute instances or processes (NVML_ERROR_IN_USE)."""


class MigNoRoom(MigRefused):
    """Slots overlap or the profile's maximum is reached (NVML_ERROR_INSUFFICIENT_RESOURCES)."""


class MigBadRequest(MigRefused):
    """Unknown profile, a start the profile does not allow, or an unknown instance."""


class MigNotSupported(MigRefused):
    """The GPU is not MIG capable or MIG mode is off."""


_CLASSES = {
    pynvml.NVML_ERROR_IN_USE: MigInUse,
    pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: MigNoRoom,
    pynvml.NVML_ERROR_INVALID_ARGUMENT: MigBadRequest,
    pynvml.NVML_ERROR_NOT_FOUND: MigBadRequest,
    pynvml.NVML_ERROR_NOT_SUPPORTED: MigNotSupported,
}
_REASONS = {
    pynvml.NVML_ERROR_IN_USE: "in use (compute instances or processes remain)",
    pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: "no room: the slots overlap an existing GPU "
    "instance or the profile's maximum count is reached",
    pynvml.NVML_ERROR_INVALID_ARGUMENT: "invalid request",
    pynvml.NVML_ERROR_NOT_FOUND: "no such instance",
    pynvml.NVML_ERROR_NOT_SUPPORTED: "not supported (GPU not MIG capable or MIG mode off)",
}


def refused(err: NvmlError, what: str) -> NvmlError:
    """The MigError for an NVML refusal of `what`; other NVML errors (GpuLost...) unchanged."""
    cls = _CLASSES.get(err.code)
    if cls is None:
        return err
    return cls(f"{what}: {_REASONS[err.code]} ({code_name(err.code)})", err.code)


@dataclass(frozen=True)
class MigMode:
    """Current and pending MIG mode; `activation_status` is NVML's answer to the last change."""

    current: bool
    pending: bool
    activation_status: int = pynvml.NVML_SUCCESS

    @property
    def needs_reset(self) -> bool:
        """Pending differs from current: a GPU reset (no processes) applies it."""
        return self.current != self.pending


@dataclass(frozen=True)
class GpuInstance:
    """A GPU instance and the ids of its compute instances."""

    gpu_index: int
    gi_id: int
    profile: str
    profile_id: int
    start: int
    size: int
    compute_instances: tuple[int, ...] = ()


def mig_mode(nvml: Nvml, gpu_index: int) -> MigMode:
    """Current and pending MIG mode of a GPU."""
    try:
        current, pending = nvml.call("nvmlDeviceGetMigMode", nvml.handle(gpu_index))
    except NvmlError as err:
        raise refused(err, f"GPU {gpu_index}: read MIG mode") from err
    return MigMode(bool(current), bool(pending))


def set_mig_mode(nvml: Nvml, gpu_index: int, enabled: bool) -> MigMode:
    """Request MIG mode on/off; on Ampere with processes running the change stays pending."""
    mode = pynvml.NVML_DEVICE_MIG_ENABLE if enabled else pynvml.NVML_DEVICE_MIG_DISABLE
    what = f"GPU {gpu_index}: {'enable' if enabled else 'disable'} MIG mode"
    try:
        status = nvml.call("nvmlDeviceSetMigMode", nvml.handle(gpu_index), mode)
    except NvmlError as err:
        raise refused(err, what) from err
    now = mig_mode(nvml, gpu_index)
    return MigMode(now.current, now.pending, int(status))


def gpu_profiles(nvml: Nvml, gpu_index: int) -> tuple[MigProfile, ...]:
    """The GI profiles this GPU offers, as NVML describes them (names per facts §6.2)."""
    handle = nvml.handle(gpu_index)
    total_mib = int(nvml.call("nvmlDeviceGetMemoryInfo", handle).total) // MIB
    profiles = []
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
        except NvmlError as err:
            if err.code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                continue
            raise
        placements = _placements(nvml, handle, int(info.id))
        starts = tuple(int(p.start) for p in placements)
        size = placements[0].size if placements else 0
        name = canonical_name(int(info.sliceCount), int(info.memorySizeMB), total_mib, index)
        profiles.append(
            MigProfile(
                name,
                index,
                int(info.id),
                int(info.sliceCount),
                int(size),
                int(info.instanceCount),
                starts,
                int(info.memorySizeMB),
                int(info.multiprocessorCount),
            )
        )
    return tuple(profiles)


def _placements(nvml: Nvml, handle: Any, profile_id: int) -> list[Any]:
    count = ctypes.c_uint(0)
    nvml.call(
        "nvmlDeviceGetGpuInstancePossiblePlacements", handle, profile_id, None, ctypes.byref(count)
    )
    array = (pynvml.c_nvmlGpuInstancePlacement_t * max(count.value, 1))()
    nvml.call(
        "nvmlDeviceGetGpuInstancePossiblePlacements", handle, profile_id, array, ctypes.byref(count)
    )
    return list(array[: count.value])


def _profile(nvml: Nvml, gpu_index: int, name: str) -> MigProfile:
    profiles = gpu_profiles(nvml, gpu_index)
    for profile in profiles:
        if profile.name == name:
            return profile
    offered = ", ".join(p.name for p in profiles) or "none"
    raise MigBadRequest(f"GPU {gpu_index}: no MIG profile {name!r} (offers: {offered})")


def create_gpu_instance(
    nvml: Nvml, gpu_index: int, profile: str, start: int | None = None
) -> GpuInstance:
    """Create a GI of `profile` at `start` (None: the driver chooses, which can fail later)."""
    p = _profile(nvml, gpu_index, profile)
    handle = nvml.handle(gpu_index)
    where = "a driver-chosen start" if start is None else f"start {start}"
    what = f"GPU {gpu_index}: create GPU instance {profile} at {where}"
    try:
        if start is None:
            gi = nvml.call("nvmlDeviceCreateGpuInstance", handle, p.id)
        else:
            placement = pynvml.c_nvmlGpuInstancePlacement_t(start, p.size)
            gi = nvml.call(
                "nvmlDeviceCreateGpuInstanceWithPlacement", handle, p.id, ctypes.byref(placement)
            )
    except NvmlError as err:
        if err.code == pynvml.NVML_ERROR_INVALID_ARGUMENT and start is not None:
            allowed = ", ".join(map(str, p.starts))
            raise MigBadRequest(
                f"{what}: start not allowed for {profile} (allowed starts: {allowed})", err.code
            ) from err
        raise refused(err, what) from err
    info = nvml.call("nvmlGpuInstanceGetInfo", gi)
    return GpuInstance(
        gpu_index, int(info.id), profile, p.id, int(info.placement.start), int(info.placement.size)
    )


def _gi_handle(nvml: Nvml, gpu_index: int, gi_id: int, what: str) -> Any:
    try:
        return nvml.call("nvmlDeviceGetGpuInstanceById", nvml.handle(gpu_index), gi_id)
    except NvmlError as err:
        raise refused(err, f"{what}: GPU instance {gi_id}") from err


def create_compute_instance(nvml: Nvml, gpu_index: int, gi_id: int) -> int:
    """Create the full compute instance (all the GI's slices) in a GI; returns the CI id."""
    what = f"GPU {gpu_index}: create compute instance in GPU instance {gi_id}"
    gi = _gi_handle(nvml, gpu_index, gi_id, what)
    slices = _gi_slices(nvml, gpu_index, gi)
    try:
        info = nvml.call(
            "nvmlGpuInstanceGetComputeInstanceProfileInfo",
            gi,
            CI_PROFILE_INDEX_BY_SLICES[slices],
            pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
        )
        ci = nvml.call("nvmlGpuInstanceCreateComputeInstance", gi, int(info.id))
        return int(nvml.call("nvmlComputeInstanceGetInfo", ci).id)
    except NvmlError as err:
        raise refused(err, what) from err


def _gi_slices(nvml: Nvml, gpu_index: int, gi: Any) -> int:
    profile_id = int(nvml.call("nvmlGpuInstanceGetInfo", gi).profileId)
    handle = nvml.handle(gpu_index)
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
        except NvmlError:
            continue
        if int(info.id) == profile_id:
            return int(info.sliceCount)
    raise MigBadRequest(f"GPU {gpu_index}: GPU instance profile id {profile_id} is unknown")


def create_mig_device(
    nvml: Nvml, gpu_index: int, profile: str, start: int | None = None
) -> GpuInstance:
    """A full MIG device: a GI of `profile` at `start` plus its full compute instance."""
    gi = create_gpu_instance(nvml, gpu_index, profile, start)
    ci_id = create_compute_instance(nvml, gpu_index, gi.gi_id)
    return GpuInstance(
        gi.gpu_index, gi.gi_id, gi.profile, gi.profile_id, gi.start, gi.size, (ci_id,)
    )


def _ci_ids(nvml: Nvml, gi: Any) -> tuple[int, ...]:
    ids = []
    for index in sorted(set(CI_PROFILE_INDEX_BY_SLICES.values())):
        try:
            info = nvml.call(
                "nvmlGpuInstanceGetComputeInstanceProfileInfo",
                gi,
                index,
                pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
            )
        except NvmlNotSupported:
            continue
        count = ctypes.c_uint(0)
        array = (pynvml.c_nvmlComputeInstance_t * max(int(info.instanceCount), 1))()
        nvml.call(
            "nvmlGpuInstanceGetComputeInstances", gi, int(info.id), array, ctypes.byref(count)
        )
        ids.extend(
            int(nvml.call("nvmlComputeInstanceGetInfo", ci).id) for ci in array[: count.value]
        )
    return tuple(sorted(ids))


def gpu_instances(nvml: Nvml, gpu_index: int) -> tuple[GpuInstance, ...]:
    """Every GPU instance of a GPU with its compute instance ids, by GI id."""
    handle = nvml.handle(gpu_index)
    found = []
    for profile in gpu_profiles(nvml, gpu_index):
        count = ctypes.c_uint(0)
        array = (pynvml.c_nvmlGpuInstance_t * max(profile.max_count, 1))()
        try:
            nvml.call("nvmlDeviceGetGpuInstances", handle, profile.id, array, ctypes.byref(count))
        except NvmlError as err:
            raise refused(err, f"GPU {gpu_index}: list GPU instances") from err
        for gi in array[: count.value]:
            info = nvml.call("nvmlGpuInstanceGetInfo", gi)
            found.append(
                GpuInstance(
                    gpu_index,
                    int(info.id),
                    profile.name,
                    profile.id,
                    int(info.placement.start),
                    int(info.placement.size),
                    _ci_ids(nvml, gi),
                )
            )
    return tuple(sorted(found, key=lambda g: g.gi_id))


def destroy_compute_instance(nvml: Nvml, gpu_index: int, gi_id: int, ci_id: int) -> None:
    """Destroy one compute instance (MigInUse while processes run on it)."""
    what = f"GPU {gpu_index}: destroy compute instance {gi_id}:{ci_id}"
    gi = _gi_handle(nvml, gpu_index, gi_id, what)
    try:
        ci = nvml.call("nvmlGpuInstanceGetComputeInstanceById", gi, ci_id)
        nvml.call("nvmlComputeInstanceDestroy", ci)
    except NvmlError as err:
        raise refused(err, what) from err


def destroy_gpu_instance(nvml: Nvml, gpu_index: int, gi_id: int) -> None:
    """Destroy one GPU instance (MigInUse while it has compute instances or processes)."""
    what = f"GPU {gpu_index}: destroy GPU instance {gi_id}"
    gi = _gi_handle(nvml, gpu_index, gi_id, what)
    try:
        nvml.call("nvmlGpuInstanceDestroy", gi)
    except NvmlError as err:
        raise refused(err, what) from err


def destroy_all(nvml: Nvml, gpu_index: int) -> int:
    """Destroy every compute and GPU instance of a GPU; returns how many GIs were destroyed."""
    instances = gpu_instances(nvml, gpu_index)
    for gi in instances:
        for ci_id in gi.compute_instances:
            destroy_compute_instance(nvml, gpu_index, gi.gi_id, ci_id)
        destroy_gpu_instance(nvml, gpu_index, gi.gi_id)
    return len(instances)


_MODE_VALUES = {
    ComputeMode.DEFAULT: pynvml.NVML_COMPUTEMODE_DEFAULT,
    ComputeMode.EXCLUSIVE_THREAD: pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD,
    ComputeMode.PROHIBITED: pynvml.NVML_COMPUTEMODE_PROHIBITED,
    ComputeMode.EXCLUSIVE_PROCESS: pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
}


def set_compute_mode(nvml: Nvml, gpu_index: int, mode: ComputeMode) -> None:
    """Set a GPU's compute mode (MPS needs EXCLUSIVE_PROCESS)."""
    nvml.call("nvmlDeviceSetComputeMode", nvml.handle(gpu_index), _MODE_VALUES[mode])


def compute_mode(nvml: Nvml, gpu_index: int) -> ComputeMode:
    """A GPU's compute mode (read before MPS sets EXCLUSIVE_PROCESS, to restore it after)."""
    value = nvml.call("nvmlDeviceGetComputeMode", nvml.handle(gpu_index))
    return next(mode for mode, v in _MODE_VALUES.items() if v == value)
