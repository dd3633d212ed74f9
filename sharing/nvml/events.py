"""NVML events for the health monitor: XID and ECC events translated into `XidEvent` values."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pynvml

from sharing.errors import NvmlError, NvmlNotSupported

NO_ID = 0xFFFFFFFF
WANTED_EVENTS = (
    pynvml.nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypeSingleBitEccError
)
_TYPE_NAMES = {
    pynvml.nvmlEventTypeXidCriticalError: "xid",
    pynvml.nvmlEventTypeDoubleBitEccError: "ecc_double",
    pynvml.nvmlEventTypeSingleBitEccError: "ecc_single",
}
_WAIT = ("nvmlEventSetWait_v2", "nvmlEventSetWait")


@dataclass(frozen=True)
class XidEvent:
    """One NVML event: the GPU, the XID (event data), its type, and the MIG GI/CI if any."""

    gpu_index: int
    gpu_uuid: str
    xid: int
    event_type: str  # "xid", "ecc_double", "ecc_single"
    gi_id: int | None = None
    ci_id: int | None = None


class NvmlCalls(Protocol):
    """What the watcher needs of the adapter (`sharing.nvml.adapter.Nvml`), which creates it."""

    def call(self, function: str, *args: Any) -> Any: ...

    def call_versioned(self, functions: tuple[str, ...], *args: Any) -> Any: ...

    def handle(self, gpu_index: int) -> Any: ...


def _address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


class EventWatcher:
    """An NVML event set over some GPUs. `failed` maps GPU index -> why it could not be watched."""

    def __init__(self, nvml: NvmlCalls, gpu_indices: Iterable[int]) -> None:
        self._nvml = nvml
        self._set = nvml.call("nvmlEventSetCreate")
        self._gpus: dict[int, tuple[int, str]] = {}  # handle address -> (index, uuid)
        self.failed: dict[int, str] = {}
        for index in gpu_indices:
            try:
                self._register(index)
            except NvmlError as err:
                self.failed[index] = str(err)

    def _register(self, index: int) -> None:
        handle = self._nvml.handle(index)
        uuid = self._nvml.call("nvmlDeviceGetUUID", handle)
        try:
            supported = self._nvml.call("nvmlDeviceGetSupportedEventTypes", handle)
        except NvmlNotSupported:
            supported = WANTED_EVENTS
        mask = WANTED_EVENTS & supported
        if not mask:
            raise NvmlNotSupported(f"GPU {index} ({uuid}) reports none of the XID/ECC events")
        self._nvml.call("nvmlDeviceRegisterEvents", handle, mask, self._set)
        self._gpus[_address(handle)] = (index, uuid)

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """GPUs whose events this watcher receives."""
        return tuple(sorted(index for index, _ in self._gpus.values()))

    def wait(self, timeout_ms: int) -> XidEvent | None:
        """The next event, or None when `timeout_ms` passes without one."""
        try:
            data = self._nvml.call_versioned(_WAIT, self._set, timeout_ms)
        except NvmlError as err:
            if err.code == pynvml.NVML_ERROR_TIMEOUT:
                return None
            raise
        index, uuid = self._gpus.get(_address(data.device), (-1, ""))
        if index < 0:
            uuid = self._nvml.call("nvmlDeviceGetUUID", data.device)
            index = next((i for i, u in self._gpus.values() if u == uuid), -1)
        return XidEvent(
            gpu_index=index,
            gpu_uuid=uuid,
            xid=int(data.eventData),
            event_type=_TYPE_NAMES.get(data.eventType, f"0x{data.eventType:x}"),
            gi_id=None if data.gpuInstanceId == NO_ID else int(data.gpuInstanceId),
            ci_id=None if data.computeInstanceId == NO_ID else int(data.computeInstanceId),
        )

    def close(self) -> None:
        """Free the event set (safe to call twice)."""
        if self._set is not None:
            event_set, self._set = self._set, None
            self._nvml.call("nvmlEventSetFree", event_set)

    def __enter__(self) -> EventWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
