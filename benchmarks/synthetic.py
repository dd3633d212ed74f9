"""Synthetic inventories and configs for the pure-function benchmarks (any GPU count)."""

from __future__ import annotations

import uuid

from sharing.config import load_config
from sharing.config_models import Config
from sharing.devices import Gpu, Inventory

NVLINK_GROUP = 8  # GPUs per NVLink-connected board in the synthetic node


def synthetic_inventory(gpu_count: int) -> Inventory:
    """`gpu_count` A100-SXM4-40GB GPUs, NVLink-connected in boards of 8, two NUMA nodes."""
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'bench-{gpu_count}-{i}')}",
            name="NVIDIA A100-SXM4-40GB",
            memory_mib=40960,
            pci_bus_id=f"00000000:{i + 1:02X}:00.0",
            pci_device_id=0x20B010DE,
            minor=i,
            numa_node=0 if i < gpu_count // 2 else 1,
            cuda_compute_capability=(8, 0),
            mig_capable=True,
        )
        for i in range(gpu_count)
    )

    def score(a: int, b: int) -> int:
        if a == b:
            return 0
        if a // NVLINK_GROUP == b // NVLINK_GROUP:
            return 1200
        return 20 if gpus[a].numa_node == gpus[b].numa_node else 10

    links = tuple(tuple(score(a, b) for b in range(gpu_count)) for a in range(gpu_count))
    return Inventory(gpus=gpus, link_scores=links)


def time_slicing_config(replicas: int) -> Config:
    """Time-slicing of every GPU with `replicas` replicas under nvidia.com/gpu."""
    return load_config(
        "version: v1\n"
        "sharing:\n"
        "  timeSlicing:\n"
        "    resources:\n"
        f"    - name: nvidia.com/gpu\n      replicas: {replicas}\n",
        source="<benchmark>",
    )
