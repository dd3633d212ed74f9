"""The simulated cards answer what the real cards answered (readings in facts §6.3).

Read on a real H200 (driver 580.159.04, MIG mode off) through the same adapter calls gpushare
makes; the simulator's H200 must give the same answers. On a GPU node, tests/test_gpu_real.py
compares the simulator with whatever card is present, field by field.
"""

from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

from sharing.nvml import CARDS, Nvml, gpu_profiles
from sharing.nvml.sim import SimNvml
from tests.card_answers import card_answers, one_gpu_node

NOT_SUPPORTED = "NVML_ERROR_NOT_SUPPORTED"

# index -> (profile id, slices, max count, memorySizeMB, SMs, name); facts §6.3.
H200_PROFILES = {
    0: (19, 1, 7, 16384, 16, "MIG 1g.18gb"),
    1: (14, 2, 3, 33280, 32, "MIG 2g.35gb"),
    2: (9, 3, 2, 71424, 60, "MIG 3g.71gb"),
    3: (5, 4, 1, 71424, 64, "MIG 4g.71gb"),
    4: (0, 7, 1, 143360, 132, "MIG 7g.141gb"),
    5: NOT_SUPPORTED,
    6: NOT_SUPPORTED,
    7: (20, 1, 1, 16384, 16, "MIG 1g.18gb+me"),
    8: NOT_SUPPORTED,
    9: (15, 1, 4, 33280, 26, "MIG 1g.35gb"),
    **dict.fromkeys(range(10, 16), NOT_SUPPORTED),
}
H200_READINGS = {
    "name": "NVIDIA H200",
    "pci_device_id": "0x233510DE",
    "memory_mib": 143771,
    "compute_capability": (9, 0),
    "mig_capable": True,
    "supported_event_types": "0xff9f",
    "recovery_action": "none",
}


@pytest.fixture
def h200(tmp_path: Path):
    """The adapter over a simulated one-GPU H200 node."""
    nvml = Nvml(SimNvml(one_gpu_node(CARDS["H200-SXM-141GB"], tmp_path / "h200")))
    nvml.init()
    yield nvml
    nvml.shutdown()


def test_simulated_h200_answers_the_real_readings(h200: Nvml) -> None:
    answers = card_answers(h200, 0)
    assert {key: answers[key] for key in H200_READINGS} == H200_READINGS
    read = {i: answers["gpu_instance_profiles"][i] for i in H200_PROFILES}
    assert read == H200_PROFILES


def test_shipped_h200_node_answers_the_same(sim_nvml) -> None:
    """configs/nodes/h200.yaml: every GPU gives the card's readings."""
    nvml, _ = sim_nvml("h200")
    for index in range(nvml.device_count()):
        answers = card_answers(nvml, index)
        assert {key: answers[key] for key in H200_READINGS} == H200_READINGS
        assert {i: answers["gpu_instance_profiles"][i] for i in H200_PROFILES} == H200_PROFILES


def test_gpushare_reads_h200_profiles_with_the_real_memory_sizes(h200: Nvml) -> None:
    """gpushare's own profile reader: names unchanged, memory as read on the card."""
    profiles = gpu_profiles(h200, 0)
    assert [(p.name, p.memory_mib, p.multiprocessor_count) for p in profiles] == [
        ("1g.18gb", 16384, 16),
        ("2g.35gb", 33280, 32),
        ("3g.71gb", 71424, 60),
        ("4g.71gb", 71424, 64),
        ("7g.141gb", 143360, 132),
        ("1g.18gb+me", 16384, 16),
        ("1g.35gb", 33280, 26),
    ]


def test_event_watcher_registers_xid_and_ecc_on_the_h200(h200: Nvml) -> None:
    """With every event type supported (0xff9f), gpushare still registers only XID and ECC."""
    with h200.event_watcher([0]) as watcher:
        assert watcher.gpu_indices == (0,)
        assert watcher.failed == {}


@pytest.mark.parametrize(
    ("model", "mask"),
    [
        pytest.param("A100-SXM4-40GB", pynvml.nvmlEventTypeXidCriticalError
                     | pynvml.nvmlEventTypeSingleBitEccError
                     | pynvml.nvmlEventTypeDoubleBitEccError | pynvml.nvmlEventMigConfigChange,
                     id="no reading: XID, ECC and MIG change"),
        pytest.param("RTX-4070-LAPTOP", pynvml.nvmlEventTypeXidCriticalError,
                     id="no reading, no ECC, no MIG: XID only"),
        pytest.param("H200-SXM-141GB", 0xFF9F, id="read on the card"),
    ],
)  # fmt: skip
def test_supported_event_types_by_card(tmp_path: Path, model: str, mask: int) -> None:
    nvml = Nvml(SimNvml(one_gpu_node(CARDS[model], tmp_path / "node")))
    nvml.init()
    try:
        assert nvml.call("nvmlDeviceGetSupportedEventTypes", nvml.handle(0)) == mask
    finally:
        nvml.shutdown()
