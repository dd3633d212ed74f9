"""Builders for test inventories: deterministic UUIDs, NUMA nodes and link scores (facts §3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sharing.devices import Gpu, Inventory, MigDevice

NVLINK_SCORE = 100  # per link, facts §3
SAME_CPU = 20
ACROSS_CPUS = 10

# (memory MiB, SM count) of full MIG devices on an A100-SXM4-40GB (facts §6.3).
A100_40GB_PROFILES: dict[str, tuple[int, int, int, int]] = {
    # profile: (memory MiB, slots, SMs, GI id base for start 0)
    "1g.5gb": (4864, 1, 14, 7),
    "1g.5gb+me": (4864, 1, 14, 7),
    "1g.10gb": (9856, 2, 14, 3),
    "2g.10gb": (9856, 2, 28, 3),
    "3g.20gb": (19968, 4, 42, 1),
    "4g.20gb": (19968, 4, 56, 1),
    "7g.40gb": (40192, 8, 98, 0),
}


def gpu_uuid(index: int, tag: str = "a100") -> str:
    """A stable GPU UUID for tests."""
    return f"GPU-{tag}{index:04d}-0000-4000-8000-{index:012d}"


def make_gpu(
    index: int,
    *,
    name: str = "NVIDIA A100-SXM4-40GB",
    memory_mib: int = 40960,
    cc: tuple[int, int] = (8, 0),
    numa_node: int | None = 0,
    tag: str = "a100",
    pci_device_id: int = 0x20B010DE,
    mig_capable: bool = True,
) -> Gpu:
    """One full GPU with deterministic identifiers."""
    return Gpu(
        index=index,
        uuid=gpu_uuid(index, tag),
        name=name,
        memory_mib=memory_mib,
        pci_bus_id=f"00000000:{0x07 + index * 0x10:02X}:00.0",
        pci_device_id=pci_device_id,
        minor=index,
        numa_node=numa_node,
        cuda_compute_capability=cc,
        mig_capable=mig_capable,
    )


def grouped_links(
    groups: Sequence[Sequence[int]], nvlinks: int = 12
) -> tuple[tuple[int, ...], ...]:
    """Link scores: `nvlinks` NVLinks inside each group, PCIe across CPUs between groups."""
    n = sum(len(g) for g in groups)
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    return tuple(
        tuple(
            0 if a == b else nvlinks * NVLINK_SCORE if group_of[a] == group_of[b] else ACROSS_CPUS
            for b in range(n)
        )
        for a in range(n)
    )


def dgx_a100() -> Inventory:
    """8 A100-SXM4-40GB on two NUMA nodes; GPUs 0-3 and 4-7 form two NVLink-dense groups."""
    gpus = tuple(make_gpu(i, numa_node=i // 4) for i in range(8))
    return Inventory(gpus=gpus, link_scores=grouped_links([range(4), range(4, 8)]))


def pcie_gpus(count: int, **kwargs: object) -> Inventory:
    """`count` GPUs on one CPU joined by PCIe only (score 20 between every pair)."""
    gpus = tuple(make_gpu(i, **kwargs) for i in range(count))  # type: ignore[arg-type]
    links = tuple(tuple(0 if a == b else SAME_CPU for b in range(count)) for a in range(count))
    return Inventory(gpus=gpus, link_scores=links)


def mig_device(gpu: Gpu, index: int, profile: str, start: int) -> MigDevice:
    """A full MIG device of an A100-40GB profile at a placement start."""
    memory, size, sms, base = A100_40GB_PROFILES[profile]
    gi_id = base + start // size
    return MigDevice(
        uuid=f"MIG-{gpu.uuid[4:12]}-{index:04d}-4000-8000-{gi_id:012d}",
        parent_uuid=gpu.uuid,
        parent_index=gpu.index,
        index=index,
        gi_id=gi_id,
        ci_id=0,
        profile=profile,
        placement_start=start,
        placement_size=size,
        memory_mib=memory,
        multiprocessor_count=sms,
        gi_cap_minor=gpu.index * 140 + gi_id * 9 + 3,
        ci_cap_minor=gpu.index * 140 + gi_id * 9 + 4,
    )


def with_mig(inventory: Inventory, layouts: dict[int, Sequence[tuple[str, int]]]) -> Inventory:
    """The inventory with MIG enabled on some GPUs: {gpu index: [(profile, start), ...]}."""
    gpus = []
    for gpu in inventory.gpus:
        if gpu.index in layouts:
            migs = tuple(
                mig_device(gpu, i, profile, start)
                for i, (profile, start) in enumerate(layouts[gpu.index])
            )
            gpu = replace(gpu, mig_enabled=True, mig_pending=True, mig_devices=migs)
        gpus.append(gpu)
    return replace(inventory, gpus=tuple(gpus))
