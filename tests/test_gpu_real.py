"""read_inventory against the real pynvml, checked against nvidia-smi (tests marked `gpu`).

The same invariants also run on every simulated node, so the simulator and real NVML answer the
adapter alike. Everything here only reads: MIG mode and compute mode are never changed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pynvml
import pytest

from sharing.devices import Inventory
from sharing.errors import NvmlUnavailable
from sharing.nvml import Nvml, nvml_session, read_inventory, shipped_nodes

QUERY = "index,uuid,name,memory.total,pci.bus_id"


def nvidia_smi_gpus() -> list[dict[str, str]]:
    """One dict per GPU from `nvidia-smi --query-gpu`; skips the test without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        pytest.skip("no NVIDIA GPU/driver: nvidia-smi not found")
    argv = [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.skip(f"no NVIDIA GPU/driver: nvidia-smi failed: {done.stderr.strip()}")
    keys = QUERY.split(",")
    return [
        dict(zip(keys, (field.strip() for field in line.split(",")), strict=True))
        for line in done.stdout.splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="module")
def real_nvml() -> Iterator[Nvml]:
    """The adapter over the real pynvml; skips when NVML cannot be initialised."""
    try:
        with nvml_session(pynvml) as nvml:
            yield nvml
    except NvmlUnavailable as err:
        pytest.skip(f"no NVIDIA GPU/driver: {err}")


def assert_consistent(inventory: Inventory) -> None:
    """Invariants every inventory satisfies, real or simulated."""
    n = len(inventory.gpus)
    assert [g.index for g in inventory.gpus] == list(range(n))
    assert len({g.uuid for g in inventory.gpus}) == n
    assert len(inventory.link_scores) == n
    assert len(inventory.nvlink_counts) == n
    for i in range(n):
        assert inventory.link_scores[i][i] == 0
        for j in range(n):
            assert inventory.link_scores[i][j] == inventory.link_scores[j][i]
            links = inventory.nvlink_counts[i][j]
            if i != j and links:
                assert inventory.link_scores[i][j] == 100 * links
            elif i != j:
                assert inventory.link_scores[i][j] in (10, 20, 30, 40, 50, 60)
    for gpu in inventory.gpus:
        assert gpu.uuid.startswith("GPU-")
        assert gpu.memory_mib > 0
        assert not gpu.lost
        assert gpu.mig_devices == () or gpu.mig_enabled
        for mig in gpu.mig_devices:
            assert mig.uuid.startswith("MIG-")
            assert mig.parent_uuid == gpu.uuid
            assert 0 < mig.memory_mib < gpu.memory_mib
            assert mig.placement_size > 0


@pytest.mark.parametrize("node", shipped_nodes())
def test_simulated_inventories_satisfy_the_invariants(inventory_of, node: str) -> None:
    assert_consistent(inventory_of(node))


@pytest.mark.gpu
def test_real_inventory_matches_nvidia_smi(real_nvml: Nvml) -> None:
    expected = nvidia_smi_gpus()
    inventory = read_inventory(real_nvml)
    assert len(inventory.gpus) == len(expected)
    for gpu, row in zip(inventory.gpus, expected, strict=True):
        assert gpu.index == int(row["index"])
        assert gpu.uuid == row["uuid"]
        assert gpu.name == row["name"]
        assert gpu.memory_mib == int(row["memory.total"])
        assert gpu.pci_bus_id.upper() == row["pci.bus_id"].upper()
    assert_consistent(inventory)


@pytest.mark.gpu
def test_real_gpus_answer_probes_and_events(real_nvml: Nvml) -> None:
    nvidia_smi_gpus()
    indices = list(range(real_nvml.device_count()))
    for index in indices:
        real_nvml.probe(index)
    with real_nvml.event_watcher(indices) as watcher:
        assert sorted([*watcher.gpu_indices, *watcher.failed]) == indices
        event = watcher.wait(10)
    assert event is None or event.gpu_index in indices
