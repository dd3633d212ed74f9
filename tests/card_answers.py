"""What gpushare reads of one GPU that belongs to its card model, asked through the adapter.

The same function reads the real `pynvml` and the simulated NVML, so a test can pin the
simulator's answers to readings taken on a real card (tests/test_card_readings.py) and, on a GPU
node, compare the two directly (tests/test_gpu_real.py). Per-board values (UUID, PCI bus id,
minor number, NUMA node, NVLink wiring) and state (MIG mode, compute mode, processes) are left
out: they belong to the node, not to the card.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml

from sharing.errors import NvmlError
from sharing.nvml import Nvml, code_name
from sharing.nvml.profiles import MIB, CardModel
from sharing.nvml.sim import create_state

ProfileAnswer = tuple[int, int, int, int, int, str] | str  # id, slices, max, MiB, SMs, name


def _answer(read: Callable[[], Any]) -> Any:
    """The value read, or the NVML error's code name (`NVML_ERROR_NOT_SUPPORTED`)."""
    try:
        return read()
    except NvmlError as err:
        return code_name(err.code)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def profile_answer(nvml: Nvml, handle: Any, index: int) -> ProfileAnswer:
    """nvmlDeviceGetGpuInstanceProfileInfo(handle, index) as gpushare reads it, or the error."""

    def read() -> ProfileAnswer:
        info = nvml.call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
        return (int(info.id), int(info.sliceCount), int(info.instanceCount),
                int(info.memorySizeMB), int(info.multiprocessorCount), _text(info.name))

    return _answer(read)


def placements_answer(nvml: Nvml, handle: Any, profile_id: int) -> tuple[int, ...] | str:
    """Allowed starts of a profile (nvmlDeviceGetGpuInstancePossiblePlacements), or the error."""

    def read() -> tuple[int, ...]:
        count = ctypes.c_uint(0)
        function = "nvmlDeviceGetGpuInstancePossiblePlacements"
        nvml.call(function, handle, profile_id, None, ctypes.byref(count))
        array = (pynvml.c_nvmlGpuInstancePlacement_t * max(count.value, 1))()
        nvml.call(function, handle, profile_id, array, ctypes.byref(count))
        return tuple(int(p.start) for p in array[: count.value])

    return _answer(read)


def card_answers(nvml: Nvml, gpu_index: int) -> dict[str, Any]:
    """Every answer of the card model that gpushare reads, by field (errors as code names)."""
    handle = nvml.handle(gpu_index)
    pci = nvml.call("nvmlDeviceGetPciInfo", handle)
    major, minor = nvml.call("nvmlDeviceGetCudaComputeCapability", handle)
    events = _answer(lambda: nvml.call("nvmlDeviceGetSupportedEventTypes", handle))
    return {
        "name": nvml.call("nvmlDeviceGetName", handle),
        "pci_device_id": f"0x{int(pci.pciDeviceId):08X}",
        "memory_mib": int(nvml.call("nvmlDeviceGetMemoryInfo", handle).total) // MIB,
        "compute_capability": (int(major), int(minor)),
        "mig_capable": not isinstance(
            _answer(lambda: nvml.call("nvmlDeviceGetMigMode", handle)), str
        ),
        "max_mig_devices": _answer(lambda: int(nvml.call("nvmlDeviceGetMaxMigDeviceCount",
                                                         handle))),
        "supported_event_types": events if isinstance(events, str) else f"0x{int(events):04x}",
        "recovery_action": _answer(lambda: nvml.recovery_action(gpu_index)),
        "gpu_instance_profiles": {
            index: profile_answer(nvml, handle, index)
            for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)
        },
    }


def one_gpu_node(card: CardModel, state_dir: Path, *, recovery_action_field: bool = True) -> Path:
    """A simulated node with one GPU of `card` (a node file and its state directory)."""
    node = state_dir.with_suffix(".yaml")
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_text(
        "name: one-card\n"
        f"recovery_action_field: {str(recovery_action_field).lower()}\n"
        f"gpus:\n  - {{model: {card.key}, bus_id: \"00000000:01:00.0\"}}\n"
    )
    return create_state(node, state_dir)
