"""MIG profile names (facts §6.2 GB formula), GI ids and the per-card profile tables (§6.3)."""

from __future__ import annotations

import pynvml
import pytest

from sharing.nvml import CARDS, canonical_name, memory_gb
from sharing.nvml.profiles import card_by_pci_id, gpu_instance_id

P = pynvml


@pytest.mark.parametrize(
    ("profile_mib", "total_mib", "gb"),
    [
        pytest.param(4864, 40960, 5, id="A100-40GB 1g"),
        pytest.param(19968, 40960, 20, id="A100-40GB 3g"),
        pytest.param(40192, 40960, 40, id="A100-40GB 7g"),
        pytest.param(9984, 81559, 10, id="H100 1g (total not a multiple of 1024)"),
        pytest.param(71424, 143771, 71, id="H200 3g rounds 70.5 up"),
        pytest.param(11904, 24576, 12, id="A30 2g"),
    ],
)
def test_memory_gb_formula(profile_mib: int, total_mib: int, gb: int) -> None:
    assert memory_gb(profile_mib, total_mib) == gb


@pytest.mark.parametrize(
    ("args", "name"),
    [
        pytest.param((1, 4864, 40960, P.NVML_GPU_INSTANCE_PROFILE_1_SLICE), "1g.5gb", id="plain"),
        pytest.param((1, 4864, 40960, P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1), "1g.5gb+me",
                     id="+me"),
        pytest.param((1, 4864, 40960, P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME), "1g.5gb+me.all",
                     id="+me.all"),
        pytest.param((1, 4864, 40960, P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME), "1g.5gb-me",
                     id="-me"),
        pytest.param((2, 9856, 40960, P.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX), "2g.10gb+gfx",
                     id="+gfx"),
        pytest.param((3, 19968, 40960, P.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 1), "1c.3g.20gb",
                     id="compute instance smaller than its GI"),
        pytest.param((3, 19968, 40960, P.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3), "3g.20gb",
                     id="full compute instance"),
    ],
)  # fmt: skip
def test_canonical_names(args: tuple, name: str) -> None:
    assert canonical_name(*args) == name


FACTS_NAMES = {
    "A100-SXM4-40GB": "1g.5gb 1g.5gb+me 1g.10gb 2g.10gb 3g.20gb 4g.20gb 7g.40gb",
    "A100-SXM4-80GB": "1g.10gb 1g.10gb+me 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb",
    "A100-PCIE-80GB": "1g.10gb 1g.10gb+me 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb",
    "H100-SXM5-80GB": "1g.10gb 1g.10gb+me 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb",
    "H100-PCIE-80GB": "1g.10gb 1g.10gb+me 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb",
    "H100-NVL-94GB": "1g.12gb 1g.12gb+me 1g.24gb 2g.24gb 3g.47gb 4g.47gb 7g.94gb",
    "H200-SXM-141GB": "1g.18gb 1g.18gb+me 1g.35gb 2g.35gb 3g.71gb 4g.71gb 7g.141gb",
    "A30": "1g.6gb 1g.6gb+me 2g.12gb 2g.12gb+me 4g.24gb",
}


@pytest.mark.parametrize("model", list(FACTS_NAMES))
def test_card_tables_give_the_documented_names(model: str) -> None:
    card = CARDS[model]
    assert [p.name for p in card.profiles] == FACTS_NAMES[model].split()
    assert card_by_pci_id(card.pci_device_id) is card


def test_eight_slot_table_matches_facts() -> None:
    rows = [
        (p.id, p.slices, p.size, p.max_count, p.starts) for p in CARDS["H200-SXM-141GB"].profiles
    ]
    assert rows == [
        (19, 1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
        (20, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
        (15, 1, 2, 4, (0, 2, 4, 6)),
        (14, 2, 2, 3, (0, 2, 4)),
        (9, 3, 4, 2, (0, 4)),
        (5, 4, 4, 1, (0,)),
        (0, 7, 8, 1, (0,)),
    ]


@pytest.mark.parametrize(
    ("slots", "start", "size", "gi_id"),
    [
        pytest.param(8, 0, 8, 0, id="7g"),
        pytest.param(8, 4, 4, 2, id="3g at 4"),
        pytest.param(8, 4, 2, 5, id="2g at 4"),
        pytest.param(8, 6, 1, 13, id="1g at 6"),
        pytest.param(4, 2, 2, 2, id="A30 2g at 2"),
        pytest.param(4, 3, 1, 6, id="A30 1g at 3"),
    ],
)
def test_gpu_instance_ids(slots: int, start: int, size: int, gi_id: int) -> None:
    assert gpu_instance_id(slots, start, size) == gi_id


EIGHT_SLOT_ROWS = [
    # NVML profile index, profile id, G, slots, max, allowed starts (facts §6.3)
    (P.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, 1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    (P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    (P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, 1, 2, 4, (0, 2, 4, 6)),
    (P.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, 2, 2, 3, (0, 2, 4)),
    (P.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, 3, 4, 2, (0, 4)),
    (P.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, 4, 4, 1, (0,)),
    (P.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, 7, 8, 1, (0,)),
]
A30_ROWS = [
    (P.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 14, 1, 1, 4, (0, 1, 2, 3)),
    (P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 21, 1, 1, 1, (0, 1, 2, 3)),
    (P.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 5, 2, 2, 2, (0, 2)),
    (P.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1, 6, 2, 2, 1, (0, 2)),
    (P.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 0, 4, 4, 1, (0,)),
]


@pytest.mark.parametrize(
    ("model", "pci_id", "slots", "rows"),
    [pytest.param("A100-SXM4-40GB", 0x20B010DE, 8, EIGHT_SLOT_ROWS, id="A100-SXM4-40GB"),
     pytest.param("A100-SXM4-80GB", 0x20B210DE, 8, EIGHT_SLOT_ROWS, id="A100-SXM4-80GB"),
     pytest.param("A100-PCIE-80GB", 0x20B510DE, 8, EIGHT_SLOT_ROWS, id="A100-PCIE-80GB"),
     pytest.param("H100-SXM5-80GB", 0x233010DE, 8, EIGHT_SLOT_ROWS, id="H100-SXM5-80GB"),
     pytest.param("H100-PCIE-80GB", 0x233110DE, 8, EIGHT_SLOT_ROWS, id="H100-PCIE-80GB"),
     pytest.param("H100-NVL-94GB", 0x232110DE, 8, EIGHT_SLOT_ROWS, id="H100-NVL-94GB"),
     pytest.param("H200-SXM-141GB", 0x233510DE, 8, EIGHT_SLOT_ROWS, id="H200-SXM-141GB"),
     pytest.param("A30", 0x20B710DE, 4, A30_ROWS, id="A30")],
)  # fmt: skip
def test_every_card_table_row_matches_facts(model: str, pci_id: int, slots: int, rows) -> None:
    card = CARDS[model]
    assert (card.pci_device_id, card.mig_slots) == (pci_id, slots)
    assert [(p.index, p.id, p.slices, p.size, p.max_count, p.starts) for p in card.profiles] == rows
    for p in card.profiles:
        assert all(start % p.size == 0 and start + p.size <= slots for start in p.starts)
        assert p.name == canonical_name(p.slices, p.memory_mib, card.memory_mib, p.index)


@pytest.mark.parametrize(
    ("model", "memory_mib", "sms"),
    [pytest.param("A100-SXM4-40GB", (4864, 4864, 9856, 9856, 19968, 19968, 40192),
                  (14, 14, 14, 28, 42, 56, 98), id="A100-SXM4-40GB"),
     pytest.param("H100-SXM5-80GB", None, (16, 16, 26, 32, 60, 64, 132), id="H100-SXM5-80GB"),
     pytest.param("H100-PCIE-80GB", None, (16, 16, 26, 32, 60, 64, 132), id="H100-PCIE-80GB")],
)  # fmt: skip
def test_documented_memory_and_sm_counts(model: str, memory_mib, sms) -> None:
    profiles = CARDS[model].profiles
    if memory_mib is not None:
        assert tuple(p.memory_mib for p in profiles) == memory_mib
    assert tuple(p.multiprocessor_count for p in profiles) == sms
