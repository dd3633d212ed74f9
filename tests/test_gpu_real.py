"""The real pynvml against nvidia-smi and against the simulator's card model (tests marked `gpu`).

read_inventory is checked against nvidia-smi, and the invariants it checks also run on every
simulated node. Every answer gpushare reads of a card (tests/card_answers.py: name, memory, compute
capability, MIG profiles with MIG mode off, event types, recovery action) is compared with what
the simulator's model of the same card (found by PCI device id) answers, so a simulated node is
only as different from the hardware as a test here shows. Everything here only reads: MIG mode
and compute mode are never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sharing.devices import Inventory
from sharing.nvml import Nvml, read_inventory, shipped_nodes
from sharing.nvml.profiles import CardModel, card_by_pci_id
from sharing.nvml.sim import SimNvml
from tests.card_answers import card_answers, one_gpu_node, placements_answer
from tests.gpu_node import nvidia_smi_gpus


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


def _simulated(card: CardModel, state_dir: Path, *, recovery_action_field: bool) -> Nvml:
    nvml = Nvml(SimNvml(one_gpu_node(card, state_dir,
                                     recovery_action_field=recovery_action_field)))
    nvml.init()
    return nvml


def _modelled_gpus(real_nvml: Nvml) -> list[tuple[int, CardModel]]:
    """(index, card model) of each real GPU the simulator models; skips when it models none."""
    found, unknown = [], []
    for index in range(real_nvml.device_count()):
        pci = real_nvml.call("nvmlDeviceGetPciInfo", real_nvml.handle(index))
        card = card_by_pci_id(int(pci.pciDeviceId))
        if card is None:
            name = real_nvml.call("nvmlDeviceGetName", real_nvml.handle(index))
            unknown.append(f"GPU {index} {name} (PCI id 0x{int(pci.pciDeviceId):08X})")
        else:
            found.append((index, card))
    if not found:
        pytest.skip(f"the simulator has no card model for {', '.join(unknown)}")
    return found


def _differences(real: dict[str, Any], simulated: dict[str, Any]) -> list[str]:
    lines = []
    for key in real:
        if key == "gpu_instance_profiles":
            lines += [f"  profile index {i}: card {real[key][i]!r}, simulator {simulated[key][i]!r}"
                      for i in real[key] if real[key][i] != simulated[key][i]]
        elif real[key] != simulated[key]:
            lines.append(f"  {key}: card {real[key]!r}, simulator {simulated[key]!r}")
    return lines


@pytest.mark.gpu
def test_simulated_card_model_answers_like_the_real_card(real_nvml: Nvml, tmp_path: Path) -> None:
    """Every card answer gpushare reads is the same on the card and on its simulated model.

    The recovery-action field is the driver's, not the card's: the simulated node is given a
    driver with the field exactly when the real driver has it, and then both must answer.
    """
    nvidia_smi_gpus()
    report = []
    for index, card in _modelled_gpus(real_nvml):
        real = card_answers(real_nvml, index)
        sim = _simulated(card, tmp_path / f"gpu{index}",
                         recovery_action_field=real["recovery_action"] is not None)
        try:
            lines = _differences(real, card_answers(sim, 0))
        finally:
            sim.shutdown()
        if lines:
            report.append(f"GPU {index} ({card.key}; sharing/nvml/profiles.py):\n"
                          + "\n".join(lines))
    assert not report, "the simulator's card model differs from the card:\n" + "\n".join(report)


@pytest.mark.gpu
def test_simulated_placements_match_the_real_card(real_nvml: Nvml, tmp_path: Path) -> None:
    """Allowed GI starts of every profile, where the card answers them in its present MIG mode."""
    nvidia_smi_gpus()
    compared, refused, report = 0, [], []
    for index, card in _modelled_gpus(real_nvml):
        if not card.mig_capable:
            continue
        sim = _simulated(card, tmp_path / f"gpu{index}", recovery_action_field=True)
        try:
            for profile in card.profiles:
                real = placements_answer(real_nvml, real_nvml.handle(index), profile.id)
                if isinstance(real, str):
                    refused.append(f"GPU {index} profile {profile.name}: {real}")
                    continue
                compared += 1
                simulated = placements_answer(sim, sim.handle(0), profile.id)
                if real != simulated:
                    report.append(f"GPU {index} {profile.name}: card {real}, simulator {simulated}")
        finally:
            sim.shutdown()
    if not compared:
        reason = "; ".join(refused[:3]) or "no MIG-capable GPU the simulator models"
        pytest.skip(f"no GI placements answered by the card to compare: {reason}")
    assert not report, "\n".join(report)
