"""A CUDA client that needs nothing but the driver: ctypes on libcuda.so.1 (standard library only).

`python cuda_client.py BYTES [BYTES ...]`: cuInit, cuDeviceGet(0), cuCtxCreate, then for each size
cuMemAlloc (freed again with cuMemFree when it succeeds), then cuCtxDestroy. Prints one JSON
object with every CUresult: {"init", "device", "context", "sms", "alloc": [[bytes, result]]};
0 is CUDA_SUCCESS, 2 CUDA_ERROR_OUT_OF_MEMORY. Run by the `gpu` tests as an MPS client, with the
environment an Allocate response gives a container.
"""

from __future__ import annotations

import ctypes
import json
import sys

CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16


def _bind(cuda: ctypes.CDLL) -> None:
    c = ctypes
    cuda.cuInit.argtypes = [c.c_uint]
    cuda.cuDeviceGet.argtypes = [c.POINTER(c.c_int), c.c_int]
    cuda.cuDeviceGetAttribute.argtypes = [c.POINTER(c.c_int), c.c_int, c.c_int]
    cuda.cuCtxCreate_v2.argtypes = [c.POINTER(c.c_void_p), c.c_uint, c.c_int]
    cuda.cuCtxDestroy_v2.argtypes = [c.c_void_p]
    cuda.cuMemAlloc_v2.argtypes = [c.POINTER(c.c_uint64), c.c_size_t]
    cuda.cuMemFree_v2.argtypes = [c.c_uint64]


def run(sizes: list[int]) -> dict[str, object]:
    """Every CUresult of the sequence; stops at the first failing setup step."""
    cuda = ctypes.CDLL("libcuda.so.1")
    _bind(cuda)
    out: dict[str, object] = {"init": cuda.cuInit(0), "alloc": []}
    if out["init"] != 0:
        return out
    device = ctypes.c_int()
    out["device"] = cuda.cuDeviceGet(ctypes.byref(device), 0)
    if out["device"] != 0:
        return out
    sms = ctypes.c_int()
    if cuda.cuDeviceGetAttribute(ctypes.byref(sms), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                                 device) == 0:
        out["sms"] = sms.value
    context = ctypes.c_void_p()
    out["context"] = cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device)
    if out["context"] != 0:
        return out
    results = []
    for size in sizes:
        pointer = ctypes.c_uint64()
        result = cuda.cuMemAlloc_v2(ctypes.byref(pointer), size)
        if result == 0:
            cuda.cuMemFree_v2(pointer)
        results.append([size, result])
    out["alloc"] = results
    cuda.cuCtxDestroy_v2(context)
    return out


if __name__ == "__main__":
    print(json.dumps(run([int(arg) for arg in sys.argv[1:]])))
