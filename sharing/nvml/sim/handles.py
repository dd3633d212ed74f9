"""Opaque NVML handles of the simulated library: real pynvml pointer types with encoded addresses.

A handle is the same ctypes pointer type real pynvml returns (`c_nvmlDevice_t`, ...); its address
encodes what it points at, so handles can be stored in ctypes arrays the caller allocated (as
`nvmlDeviceGetGpuInstances` requires) and compared by address like real ones. Nothing dereferences
them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import pynvml

_TAG_SHIFT = 40
_TAG_DEVICE = 0x5D
_TAG_GI = 0x5E
_TAG_CI = 0x5F
_TAG_EVENT_SET = 0x60
_NONE = 0xFF


@dataclass(frozen=True)
class Ref:
    """What a handle points at: a GPU, a MIG device, a GI, a CI or an event set."""

    tag: int
    gpu: int
    gi: int | None = None
    ci: int | None = None

    @property
    def is_mig(self) -> bool:
        """Whether a device handle names a MIG device."""
        return self.tag == _TAG_DEVICE and self.gi is not None


def _address(tag: int, gpu: int, gi: int | None, ci: int | None) -> int:
    gi_bits = _NONE if gi is None else gi
    ci_bits = _NONE if ci is None else ci
    return (tag << _TAG_SHIFT) | (gpu << 16) | (gi_bits << 8) | ci_bits


def _pointer(kind: type, address: int) -> ctypes._Pointer:
    return ctypes.cast(ctypes.c_void_p(address), kind)


def device(gpu: int, gi: int | None = None, ci: int | None = None) -> ctypes._Pointer:
    """A `c_nvmlDevice_t` for a GPU, or for a MIG device when gi and ci are given."""
    return _pointer(pynvml.c_nvmlDevice_t, _address(_TAG_DEVICE, gpu, gi, ci))


def gpu_instance(gpu: int, gi: int) -> ctypes._Pointer:
    """A `c_nvmlGpuInstance_t`."""
    return _pointer(pynvml.c_nvmlGpuInstance_t, _address(_TAG_GI, gpu, gi, None))


def compute_instance(gpu: int, gi: int, ci: int) -> ctypes._Pointer:
    """A `c_nvmlComputeInstance_t`."""
    return _pointer(pynvml.c_nvmlComputeInstance_t, _address(_TAG_CI, gpu, gi, ci))


def event_set(number: int) -> ctypes._Pointer:
    """A `c_nvmlEventSet_t`."""
    return _pointer(pynvml.c_nvmlEventSet_t, _address(_TAG_EVENT_SET, number, None, None))


def address_of(handle: object) -> int:
    """The address a handle holds (0 for NULL or a non-pointer)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value or 0
    except (TypeError, ctypes.ArgumentError):
        return 0


def decode(handle: object, tag: int) -> Ref:
    """The Ref behind a handle of the expected kind; NVMLError(INVALID_ARGUMENT) otherwise."""
    address = address_of(handle)
    if address >> _TAG_SHIFT != tag:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    gi = (address >> 8) & 0xFF
    ci = address & 0xFF
    return Ref(
        tag, (address >> 16) & 0xFFFFFF, None if gi == _NONE else gi, None if ci == _NONE else ci
    )


def decode_device(handle: object) -> Ref:
    """Ref of a `c_nvmlDevice_t` (GPU or MIG device)."""
    return decode(handle, _TAG_DEVICE)


def decode_gpu_instance(handle: object) -> Ref:
    """Ref of a `c_nvmlGpuInstance_t`."""
    return decode(handle, _TAG_GI)


def decode_compute_instance(handle: object) -> Ref:
    """Ref of a `c_nvmlComputeInstance_t`."""
    return decode(handle, _TAG_CI)


def decode_event_set(handle: object) -> int:
    """Number of a `c_nvmlEventSet_t`."""
    return decode(handle, _TAG_EVENT_SET).gpu


def deref(ref: object) -> object:
    """The ctypes object behind `byref(x)` (or x itself when passed directly)."""
    return getattr(ref, "_obj", ref)
