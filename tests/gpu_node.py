"""What a GPU node offers the `gpu` tests: nvidia-smi, NVML, libcuda and the MPS control program.

Each finder skips the calling test, with the reason, where the piece is missing, so the same
suite runs everywhere: on a machine without a GPU every `gpu` test reports why it did not run.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

QUERY = "index,uuid,name,memory.total,pci.bus_id"
MPS_CONTROL = "nvidia-cuda-mps-control"
LIBCUDA = "libcuda.so.1"


def nvidia_smi() -> str:
    """Path of nvidia-smi; skips the test without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        pytest.skip("no NVIDIA GPU/driver: nvidia-smi not found")
    return exe


def nvidia_smi_gpus() -> list[dict[str, str]]:
    """One dict per GPU from `nvidia-smi --query-gpu`; skips the test without a driver."""
    argv = [nvidia_smi(), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.skip(f"no NVIDIA GPU/driver: nvidia-smi failed: {done.stderr.strip()}")
    keys = QUERY.split(",")
    return [
        dict(zip(keys, (field.strip() for field in line.split(",")), strict=True))
        for line in done.stdout.splitlines()
        if line.strip()
    ]


def mps_control_program() -> str:
    """nvidia-cuda-mps-control from PATH, else beside nvidia-smi (the driver's bin directory)."""
    found = shutil.which(MPS_CONTROL)
    if found is None:
        beside = Path(os.path.realpath(nvidia_smi())).with_name(MPS_CONTROL)
        found = str(beside) if os.access(beside, os.X_OK) else None
    if found is None:
        pytest.skip(f"no {MPS_CONTROL} on PATH or beside nvidia-smi (MPS is not installed)")
    return found


def require_libcuda() -> None:
    """Skip the test unless the CUDA driver library loads."""
    try:
        ctypes.CDLL(LIBCUDA)
    except OSError as err:
        pytest.skip(f"no CUDA driver library: {LIBCUDA} does not load ({err})")
