"""An MPS client's environment from an Allocate response, as a container would see it.

In a container the runtime bind-mounts the response's mounts. A client started on the host gets
the same view: the response's MPS variables, each value that is a container path under a mount
replaced by the mount's host path. CUDA_VISIBLE_DEVICES is not set: an MPS client sees the GPUs
of its server (the control daemon's CUDA_VISIBLE_DEVICES, remapped from 0), and the MPS
documentation asks that clients leave it unset. Used by the `gpu` tests with the real CUDA
driver, and checked without a GPU against the simulated node.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from plugin.api import pb

CLIENT = Path(__file__).resolve().with_name("cuda_client.py")
MPS_CLIENT_ENV = (
    "CUDA_MPS_PIPE_DIRECTORY",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
)


def host_path(value: str, mounts: Iterable[pb.Mount]) -> str:
    """`value` with a leading container mount path replaced by that mount's host path."""
    for mount in sorted(mounts, key=lambda m: len(m.container_path), reverse=True):
        root = mount.container_path.rstrip("/")
        if value == root:
            return mount.host_path
        if value.startswith(root + "/"):
            return posixpath.join(mount.host_path, value[len(root) + 1:])
    return value


def base_env() -> dict[str, str]:
    """This process's environment without any CUDA or NVIDIA device selection of its own."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("CUDA_") and k != "NVIDIA_VISIBLE_DEVICES"}


def client_env(
    response: pb.ContainerAllocateResponse, names: Iterable[str] = MPS_CLIENT_ENV
) -> dict[str, str]:
    """base_env() plus the response's variables `names`, container paths mapped to host paths."""
    env = base_env()
    for name in names:
        env[name] = host_path(response.envs[name], response.mounts)
    return env


def run_client(env: Mapping[str, str], *sizes: int, timeout_s: float = 120) -> dict:
    """Run tests/cuda_client.py with `env`; its JSON answer (the test fails on a crash)."""
    done = subprocess.run([sys.executable, str(CLIENT), *map(str, sizes)], env=dict(env),
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"CUDA client failed ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
