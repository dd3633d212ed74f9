"""The one gate to NVML: every call of gpushare goes through `Nvml.call`.

The library object is the real `pynvml` module or the simulated one (`sharing.nvml.sim.SimNvml`);
both raise `pynvml.NVMLError_*`. The gate maps them to `sharing.errors` in one place, decodes bytes,
turns a missing function into `NvmlNotSupported`, and probes `_v2` variants once. A field value's
own return code (`nvmlDeviceGetFieldValues`) is mapped the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pynvml

from sharing.errors import GpuLost, NvmlError, NvmlNotSupported, NvmlUnavailable
from sharing.nvml.events import EventWatcher
from sharing.nvml.host import HostFiles
from sharing.nvml.recovery import FIELD_RECOVERY_ACTION, recovery_action_name

_UNAVAILABLE = frozenset({
    pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
})  # fmt: skip
_NOT_SUPPORTED = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})
# A field value answering these means the driver does not report that field (a driver older than
# the field ID may answer INVALID_ARGUMENT rather than NOT_SUPPORTED).
_FIELD_UNKNOWN = _NOT_SUPPORTED | {pynvml.NVML_ERROR_INVALID_ARGUMENT}
_LOST = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN})
# What an operator checks when nvmlInit fails with these.
_INIT_HINTS = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 not found: is the NVIDIA driver"
    " installed, and does the container run with the NVIDIA runtime (runtimeClassName: nvidia)?",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded on this node",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "the NVML library and the loaded kernel driver"
    " differ in version: reboot or reload the driver after an upgrade",
}
_CODE_NAMES = {
    getattr(pynvml, name): name for name in dir(pynvml) if name.startswith("NVML_ERROR_")
}


def code_name(code: int | None) -> str:
    """`NVML_ERROR_IN_USE` for 19, and so on."""
    return _CODE_NAMES.get(code, f"NVML error {code}") if code is not None else "unknown error"


def translate(err: pynvml.NVMLError, function: str) -> NvmlError:
    """Our exception for a pynvml exception raised by `function`."""
    code = getattr(err, "value", None)
    message = f"{function}: {code_name(code)}"
    if code in _LOST:
        return GpuLost(message, code)
    if code in _NOT_SUPPORTED:
        return NvmlNotSupported(message, code)
    if code in _UNAVAILABLE:
        return NvmlUnavailable(message, code)
    return NvmlError(message, code)


def host_root_for(lib: object) -> Path:
    """Root of the host files (sysfs, procfs) that go with an NVML library object.

    A simulated library carries its own `host_root` (its state directory's `host/`); the real
    `pynvml` module has none and reads the machine's `/`. The adapter never imports the
    simulator: `load_library` chose the library, and the library says where its host lives.
    """
    root = getattr(lib, "host_root", None)
    return Path(root) if root is not None else Path("/")


def numa_reader_for(lib: object) -> Callable[[str], int | None]:
    """NUMA node reader (PCI bus id -> node) that goes with an NVML library object."""
    return HostFiles(host_root_for(lib)).numa_node


class Nvml:
    """The adapter over one NVML library object (real `pynvml` or the simulated one)."""

    def __init__(self, lib: Any, *, host_root: Path | None = None) -> None:
        self.lib = lib
        self.host = HostFiles(host_root_for(lib) if host_root is None else host_root)
        self._chosen: dict[tuple[str, ...], str] = {}

    def call(self, function: str, *args: Any) -> Any:
        """Call one NVML function; raises NvmlError subclasses, returns str for bytes."""
        fn = getattr(self.lib, function, None)
        if fn is None:
            raise NvmlNotSupported(f"{function}: not provided by this NVML library")
        try:
            result = fn(*args)
        except pynvml.NVMLError as err:
            raise translate(err, function) from err
        except pynvml.NVMLLibraryMismatchError as err:
            raise NvmlNotSupported(f"{function}: {err}") from err
        return result.decode() if isinstance(result, bytes) else result

    def call_versioned(self, functions: tuple[str, ...], *args: Any) -> Any:
        """Call the first of `functions` the library supports; the choice is probed once."""
        chosen = self._chosen.get(functions)
        if chosen is not None:
            return self.call(chosen, *args)
        for i, function in enumerate(functions):
            try:
                result = self.call(function, *args)
            except NvmlNotSupported as err:
                if err.code == pynvml.NVML_ERROR_NOT_SUPPORTED or i == len(functions) - 1:
                    raise
                continue
            self._chosen[functions] = function
            return result
        raise NvmlNotSupported(f"none of {', '.join(functions)} is available")

    # -- lifecycle -----------------------------------------------------------------------------
    def init(self) -> None:
        """nvmlInit; any failure is NvmlUnavailable (the caller applies failOnInitError)."""
        try:
            self.call("nvmlInit")
        except NvmlError as err:
            hint = _INIT_HINTS.get(err.code)
            message = f"NVML init failed: {err}" + (f" ({hint})" if hint else "")
            raise NvmlUnavailable(message, err.code) from err

    def shutdown(self) -> None:
        """nvmlShutdown."""
        self.call("nvmlShutdown")

    # -- common queries ------------------------------------------------------------------------
    def device_count(self) -> int:
        """Number of GPUs NVML sees."""
        return int(self.call("nvmlDeviceGetCount"))

    def handle(self, gpu_index: int) -> Any:
        """Device handle of a GPU index."""
        return self.call("nvmlDeviceGetHandleByIndex", gpu_index)

    def probe(self, gpu_index: int) -> None:
        """Raise GpuLost when the GPU does not answer a live query."""
        handle = self.handle(gpu_index)
        self.call("nvmlDeviceGetUUID", handle)
        self.call("nvmlDeviceGetMemoryInfo", handle)

    def recovery_action(self, gpu_index: int) -> str | None:
        """The driver's recovery action for a GPU (`none`, `gpu_reset`, ...); None: not reported.

        Raises:
            GpuLost: the GPU does not answer. NvmlError: any other failure of the read.
        """
        function = "nvmlDeviceGetFieldValues"
        handle = self.handle(gpu_index)
        try:
            [value] = self.call(function, handle, [FIELD_RECOVERY_ACTION])
        except NvmlNotSupported:
            return None
        if value.nvmlReturn in _FIELD_UNKNOWN:
            return None
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            raise translate(pynvml.NVMLError(value.nvmlReturn), f"{function}(recovery action)")
        return recovery_action_name(value.value.uiVal)

    def event_watcher(self, gpu_indices: Iterable[int]) -> EventWatcher:
        """An event set registered for XID and ECC events of these GPUs."""
        return EventWatcher(self, gpu_indices)


@contextlib.contextmanager
def nvml_session(lib: Any, *, host_root: Path | None = None) -> Iterator[Nvml]:
    """Init NVML once, yield the adapter, shut NVML down on exit."""
    nvml = Nvml(lib, host_root=host_root)
    nvml.init()
    try:
        yield nvml
    finally:
        with contextlib.suppress(NvmlError):
            nvml.shutdown()
