"""The simulated NVML keeps pynvml's contract: names, signatures, return types, exceptions."""

from __future__ import annotations

import ctypes
import inspect

import pynvml
import pytest

from sharing.nvml import Nvml, read_inventory
from sharing.nvml.sim import SimNvml, lose_gpu

USED_FUNCTIONS = """
nvmlInit nvmlShutdown nvmlSystemGetDriverVersion nvmlSystemGetCudaDriverVersion nvmlDeviceGetCount
nvmlDeviceGetHandleByIndex nvmlDeviceGetHandleByUUID nvmlDeviceGetUUID nvmlDeviceGetName
nvmlDeviceGetMemoryInfo nvmlDeviceGetPciInfo nvmlDeviceGetMinorNumber
nvmlDeviceGetCudaComputeCapability nvmlDeviceGetTopologyCommonAncestor nvmlDeviceGetNvLinkState
nvmlDeviceGetNvLinkRemotePciInfo nvmlDeviceGetComputeRunningProcesses nvmlDeviceGetMigMode
nvmlDeviceSetMigMode nvmlDeviceGetComputeMode nvmlDeviceSetComputeMode
nvmlDeviceGetGpuInstanceProfileInfo nvmlDeviceGetGpuInstancePossiblePlacements
nvmlDeviceCreateGpuInstance nvmlDeviceCreateGpuInstanceWithPlacement nvmlDeviceGetGpuInstances
nvmlDeviceGetGpuInstanceById nvmlGpuInstanceGetInfo nvmlGpuInstanceGetComputeInstanceProfileInfo
nvmlGpuInstanceCreateComputeInstance nvmlGpuInstanceGetComputeInstances
nvmlGpuInstanceGetComputeInstanceById nvmlComputeInstanceGetInfo nvmlComputeInstanceDestroy
nvmlGpuInstanceDestroy nvmlDeviceGetMaxMigDeviceCount nvmlDeviceGetMigDeviceHandleByIndex
nvmlDeviceGetDeviceHandleFromMigDeviceHandle nvmlDeviceIsMigDeviceHandle
nvmlDeviceGetGpuInstanceId nvmlDeviceGetComputeInstanceId nvmlDeviceGetAttributes
nvmlDeviceGetSupportedEventTypes nvmlEventSetCreate nvmlDeviceRegisterEvents nvmlEventSetWait
nvmlEventSetWait_v2 nvmlEventSetFree nvmlDeviceGetFieldValues
""".split()


def _parameters(fn: object) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", USED_FUNCTIONS)
def test_function_has_the_pynvml_signature(name: str) -> None:
    assert _parameters(getattr(SimNvml, name)) == _parameters(getattr(pynvml, name))


SIM_FUNCTIONS = sorted(
    name
    for name in dir(SimNvml)
    if name.startswith("nvml") and inspect.isfunction(getattr(SimNvml, name))
)


@pytest.mark.parametrize("name", SIM_FUNCTIONS)
def test_every_simulated_function_is_pynvml_shaped(name: str) -> None:
    real = getattr(pynvml, name)
    sim = inspect.signature(getattr(SimNvml, name)).parameters.values()
    assert [(p.name, p.default) for p in sim if p.name != "self"] == [
        (p.name, p.default) for p in inspect.signature(real).parameters.values()
    ]


@pytest.fixture
def lib(sim_state) -> SimNvml:
    """An initialised simulated library on the mixed node."""
    library = SimNvml(sim_state("mixed"))
    library.nvmlInit()
    return library


def test_return_types_are_pynvml_structures(lib: SimNvml) -> None:
    gpu = lib.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(gpu, pynvml.c_nvmlDevice_t)
    assert isinstance(lib.nvmlDeviceGetPciInfo(gpu), pynvml.nvmlPciInfo_t)
    assert isinstance(lib.nvmlDeviceGetMemoryInfo(gpu), pynvml.c_nvmlMemory_t)
    assert isinstance(lib.nvmlDeviceGetMemoryInfo(gpu, version=2), pynvml.c_nvmlMemory_v2_t)
    info = lib.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE)
    assert isinstance(info, pynvml.c_nvmlGpuInstanceProfileInfo_v2_t)
    assert (info.id, info.sliceCount, info.memorySizeMB, info.name) == (9, 3, 39936, "MIG 3g.40gb")
    gi = lib.nvmlDeviceGetGpuInstanceById(gpu, 2)
    assert isinstance(gi, pynvml.c_nvmlGpuInstance_t)
    gi_info = lib.nvmlGpuInstanceGetInfo(gi)
    assert isinstance(gi_info, pynvml.c_nvmlGpuInstanceInfo_t)
    assert (gi_info.placement.start, gi_info.placement.size) == (4, 4)
    assert lib.nvmlDeviceGetMigMode(gpu) == [1, 1]
    mig = lib.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    assert lib.nvmlDeviceIsMigDeviceHandle(mig).value == 1
    assert lib.nvmlDeviceGetName(mig) == "NVIDIA A100 80GB PCIe MIG 3g.40gb"
    parent = lib.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
    assert lib.nvmlDeviceGetUUID(parent) == lib.nvmlDeviceGetUUID(gpu)
    uuid = lib.nvmlDeviceGetUUID(mig)
    assert lib.nvmlDeviceGetGpuInstanceId(lib.nvmlDeviceGetHandleByUUID(uuid)) == 2


def test_caller_allocated_arrays_are_filled(lib: SimNvml) -> None:
    gpu = lib.nvmlDeviceGetHandleByIndex(0)
    count = ctypes.c_uint(0)
    lib.nvmlDeviceGetGpuInstancePossiblePlacements(gpu, 14, None, ctypes.byref(count))
    assert count.value == 3
    placements = (pynvml.c_nvmlGpuInstancePlacement_t * 3)()
    lib.nvmlDeviceGetGpuInstancePossiblePlacements(gpu, 14, placements, ctypes.byref(count))
    assert [(p.start, p.size) for p in placements] == [(0, 2), (2, 2), (4, 2)]
    too_small = (pynvml.c_nvmlGpuInstancePlacement_t * 2)()
    with pytest.raises(pynvml.NVMLError_InsufficientSize):
        lib.nvmlDeviceGetGpuInstancePossiblePlacements(gpu, 14, too_small, ctypes.byref(count))
    gis = (pynvml.c_nvmlGpuInstance_t * 7)()
    lib.nvmlDeviceGetGpuInstances(gpu, 19, gis, ctypes.byref(count))
    assert sorted(lib.nvmlGpuInstanceGetInfo(g).id for g in gis[: count.value]) == [7, 8]


@pytest.mark.parametrize(
    ("ci_profile", "name"),
    [pytest.param(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, "1c.3g.40gb", id="1c of a 3g"),
     pytest.param(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE, "2c.3g.40gb", id="2c of a 3g"),
     pytest.param(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE, "3g.40gb", id="full CI")],
)  # fmt: skip
def test_mig_device_name_tells_a_partial_compute_instance(lib: SimNvml, ci_profile, name) -> None:
    gpu = lib.nvmlDeviceGetHandleByIndex(1)
    gi = lib.nvmlDeviceGetGpuInstanceById(gpu, 2)
    lib.nvmlComputeInstanceDestroy(lib.nvmlGpuInstanceGetComputeInstanceById(gi, 0))
    lib.nvmlGpuInstanceCreateComputeInstance(gi, ci_profile)
    mig = lib.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 1)
    assert lib.nvmlDeviceGetName(mig) == f"NVIDIA A100 80GB PCIe MIG {name}"
    nvml = Nvml(lib)
    assert read_inventory(nvml).gpus[1].mig_devices[1].profile == name


def test_processes_are_friendly_objects(lib: SimNvml, sim_state) -> None:
    from sharing.nvml.sim import start_process

    pid = start_process(lib.state_dir, 0, gi=4, ci=0, used_mib=100)
    procs = lib.nvmlDeviceGetComputeRunningProcesses(lib.nvmlDeviceGetHandleByIndex(0))
    assert [(p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId) for p in procs] == [
        (pid, 100 * 1024 * 1024, 4, 0)
    ]


def _create_twice(lib: SimNvml) -> None:
    gpu = lib.nvmlDeviceGetHandleByIndex(1)
    lib.nvmlDeviceCreateGpuInstance(gpu, 9)


def _bad_start(lib: SimNvml) -> None:
    gpu = lib.nvmlDeviceGetHandleByIndex(1)
    placement = pynvml.c_nvmlGpuInstancePlacement_t(2, 4)
    lib.nvmlDeviceCreateGpuInstanceWithPlacement(gpu, 9, ctypes.byref(placement))


def _destroy_busy(lib: SimNvml) -> None:
    lib.nvmlGpuInstanceDestroy(
        lib.nvmlDeviceGetGpuInstanceById(lib.nvmlDeviceGetHandleByIndex(1), 1)
    )


def _lost(lib: SimNvml) -> None:
    lose_gpu(lib.state_dir, 3)
    lib.nvmlDeviceGetMemoryInfo(lib.nvmlDeviceGetHandleByIndex(3))


@pytest.mark.parametrize(
    ("call", "error", "code"),
    [
        pytest.param(
            lambda lib: lib.nvmlDeviceGetHandleByIndex(4),
            pynvml.NVMLError_InvalidArgument,
            pynvml.NVML_ERROR_INVALID_ARGUMENT,
            id="index past the last GPU",
        ),
        pytest.param(
            lambda lib: lib.nvmlDeviceGetHandleByUUID("GPU-nope"),
            pynvml.NVMLError_NotFound,
            pynvml.NVML_ERROR_NOT_FOUND,
            id="unknown UUID",
        ),
        pytest.param(
            lambda lib: lib.nvmlDeviceGetMigMode(lib.nvmlDeviceGetHandleByIndex(2)),
            pynvml.NVMLError_NotSupported,
            pynvml.NVML_ERROR_NOT_SUPPORTED,
            id="L4 MIG mode",
        ),
        pytest.param(
            lambda lib: lib.nvmlDeviceGetNvLinkState(lib.nvmlDeviceGetHandleByIndex(2), 0),
            pynvml.NVMLError_NotSupported,
            pynvml.NVML_ERROR_NOT_SUPPORTED,
            id="no NVLink",
        ),
        pytest.param(
            _create_twice,
            pynvml.NVMLError_InsufficientResources,
            pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES,
            id="third 3g",
        ),
        pytest.param(
            _bad_start,
            pynvml.NVMLError_InvalidArgument,
            pynvml.NVML_ERROR_INVALID_ARGUMENT,
            id="3g at start 2",
        ),
        pytest.param(
            _destroy_busy, pynvml.NVMLError_InUse, pynvml.NVML_ERROR_IN_USE, id="destroy GI with CI"
        ),
        pytest.param(
            _lost, pynvml.NVMLError_GpuIsLost, pynvml.NVML_ERROR_GPU_IS_LOST, id="lost GPU"
        ),
        pytest.param(
            lambda lib: lib.nvmlEventSetWait(lib.nvmlEventSetCreate(), 1),
            pynvml.NVMLError_Timeout,
            pynvml.NVML_ERROR_TIMEOUT,
            id="event timeout",
        ),
        pytest.param(
            lambda lib: lib.nvmlDeviceGetGpuInstanceProfileInfo(
                lib.nvmlDeviceGetHandleByIndex(0), 0, 3
            ),
            pynvml.NVMLError_FunctionNotFound,
            pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
            id="GI profile info version 3",
        ),
        pytest.param(
            lambda lib: lib.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                lib.nvmlDeviceGetGpuInstanceById(lib.nvmlDeviceGetHandleByIndex(0), 2), 0, 0, 3
            ),
            pynvml.NVMLError_FunctionNotFound,
            pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
            id="CI profile info version 3",
        ),
        pytest.param(
            lambda lib: lib.nvmlDeviceSetComputeMode(lib.nvmlDeviceGetHandleByIndex(0), 1),
            pynvml.NVMLError_NotSupported,
            pynvml.NVML_ERROR_NOT_SUPPORTED,
            id="exclusive-thread compute mode",
        ),
    ],
)
def test_errors_are_the_real_pynvml_classes(lib: SimNvml, call, error: type, code: int) -> None:
    with pytest.raises(error) as info:
        call(lib)
    assert info.value.value == code


def test_uninitialised_library_refuses(sim_state) -> None:
    lib = SimNvml(sim_state("laptop"))
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        lib.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        lib.nvmlShutdown()


def test_static_facts_of_a_lost_gpu_still_answer(lib: SimNvml) -> None:
    lose_gpu(lib.state_dir, 2)
    handle = lib.nvmlDeviceGetHandleByIndex(2)
    assert lib.nvmlDeviceGetName(handle) == "NVIDIA L4"
    assert lib.nvmlDeviceGetPciInfo(handle).busId == "00000000:81:00.0"


def test_topology_constants_and_nvlink_peers(sim_state) -> None:
    lib = SimNvml(sim_state("a30x4"))
    lib.nvmlInit()
    gpus = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(4)]
    assert lib.nvmlDeviceGetTopologyCommonAncestor(gpus[0], gpus[1]) == pynvml.NVML_TOPOLOGY_SINGLE
    assert lib.nvmlDeviceGetTopologyCommonAncestor(gpus[2], gpus[3]) == (
        pynvml.NVML_TOPOLOGY_HOSTBRIDGE
    )
    assert lib.nvmlDeviceGetTopologyCommonAncestor(gpus[0], gpus[2]) == pynvml.NVML_TOPOLOGY_SYSTEM
    assert [lib.nvmlDeviceGetNvLinkState(gpus[0], link) for link in range(4)] == [1, 1, 1, 1]
    assert lib.nvmlDeviceGetNvLinkRemotePciInfo(gpus[0], 0).busId == "00000000:31:00.0"
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        lib.nvmlDeviceGetNvLinkState(gpus[0], 4)
