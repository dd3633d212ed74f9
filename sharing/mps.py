"""MPS limit arithmetic and directory layout (facts §4). Pure: no processes, no files."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

MAX_CLIENTS = 48  # per GPU, compute capability 7.5 and newer
MAX_CLIENTS_BEFORE_VOLTA_MPS = 16  # per GPU, below compute capability 7.5
SHM_DIR_NAME = "shm"  # `<root>/shm`; no resource directory may take this name


def active_thread_percentage(replicas: int) -> int:
    """Default active thread percentage of one client: 100 / replicas, at least 1."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return max(1, 100 // replicas)


def pinned_mem_limit_mib(total_mib: int, replicas: int) -> int:
    """Default pinned device memory limit of one client: total / replicas (MiB)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return total_mib // replicas


def max_clients(compute_capability: tuple[int, int]) -> int:
    """Most MPS clients one GPU accepts: 48, or 16 below compute capability 7.5."""
    return MAX_CLIENTS if compute_capability >= (7, 5) else MAX_CLIENTS_BEFORE_VOLTA_MPS


def format_mem_limit(mib: int) -> str:
    """A memory limit as MPS commands and environment variables take it: `<n>M`."""
    return f"{mib}M"


def pinned_mem_env(limits: tuple[tuple[int, int], ...]) -> str:
    """`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` value: `0=4096M,1=4096M` from (device, MiB) pairs."""
    return ",".join(f"{device}={format_mem_limit(mib)}" for device, mib in limits)


@dataclass(frozen=True)
class MpsPaths:
    """Directory layout under mpsRoot: `<root>/<resource>/pipe`, `<root>/<resource>/log`,
    `<root>/shm`, where `<resource>` is the resource name after its vendor domain."""

    root: str

    @staticmethod
    def _suffix(resource: str) -> str:
        """The resource name after its vendor domain (`nvidia.com/gpu` -> `gpu`)."""
        return resource.rsplit("/", 1)[-1]

    def resource_dir(self, resource: str) -> str:
        """Directory of one MPS resource."""
        return posixpath.join(self.root, self._suffix(resource))

    def pipe_dir(self, resource: str) -> str:
        """CUDA_MPS_PIPE_DIRECTORY of the resource's control daemon."""
        return posixpath.join(self.resource_dir(resource), "pipe")

    def log_dir(self, resource: str) -> str:
        """CUDA_MPS_LOG_DIRECTORY of the resource's control daemon."""
        return posixpath.join(self.resource_dir(resource), "log")

    def shm_dir(self) -> str:
        """The tmpfs shared as the clients' /dev/shm."""
        return posixpath.join(self.root, SHM_DIR_NAME)
