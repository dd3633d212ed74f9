"""Counting NVML mutations at the pynvml boundary: a pass-through around a library object.

The adapter receives `MutationCounter(lib)` in place of the library; every call goes through
unchanged, and each call of a mutating NVML function is recorded with the GPU it acts on
(decoded from the simulated library's device, GPU instance or compute instance handle).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sharing.nvml.sim import handles

MUTATORS = {
    "nvmlDeviceSetMigMode": handles.decode_device,
    "nvmlDeviceCreateGpuInstance": handles.decode_device,
    "nvmlDeviceCreateGpuInstanceWithPlacement": handles.decode_device,
    "nvmlDeviceSetComputeMode": handles.decode_device,
    "nvmlGpuInstanceDestroy": handles.decode_gpu_instance,
    "nvmlGpuInstanceCreateComputeInstance": handles.decode_gpu_instance,
    "nvmlComputeInstanceDestroy": handles.decode_compute_instance,
}


class MutationCounter:
    """Wraps an NVML library object; `mutations` lists (function, GPU index) in call order."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.mutations: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._lib, name)
        decode = MUTATORS.get(name)
        if decode is None:
            return attr

        def counted(*args: Any) -> Any:
            self.mutations.append((name, decode(args[0]).gpu))
            return attr(*args)

        return counted

    def gpus(self) -> Counter[int]:
        """Mutations per GPU index."""
        return Counter(gpu for _, gpu in self.mutations)
