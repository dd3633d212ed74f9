"""read_inventory against every shipped simulated node: each matches its description."""

from __future__ import annotations

import pynvml
import pytest

from sharing.devices import ComputeMode
from sharing.nvml import Nvml, numa_reader_for, read_inventory, set_compute_mode, shipped_nodes
from sharing.nvml.sim import SimNvml, handles, lose_gpu, reset_gpu, start_process

A100_40 = ("NVIDIA A100-SXM4-40GB", 40960, (8, 0), 0x20B010DE)
H100 = ("NVIDIA H100 80GB HBM3", 81559, (9, 0), 0x233010DE)
H200 = ("NVIDIA H200", 143771, (9, 0), 0x233510DE)
A30 = ("NVIDIA A30", 24576, (8, 0), 0x20B710DE)
A100_80P = ("NVIDIA A100 80GB PCIe", 81920, (8, 0), 0x20B510DE)
L4 = ("NVIDIA L4", 23034, (8, 9), 0x27B810DE)
LAPTOP = ("NVIDIA GeForce RTX 4070 Laptop GPU", 8188, (8, 9), 0x282010DE)


def all_pairs(n: int, value: int) -> tuple[tuple[int, ...], ...]:
    """A symmetric matrix with `value` off the diagonal."""
    return tuple(tuple(0 if i == j else value for j in range(n)) for i in range(n))


# node: (card per GPU, NUMA per GPU, (mig capable, current, pending) per GPU,
#        MIG profiles per GPU, link scores, NVLink counts)
NODES = {
    "dgx-a100": (
        [A100_40] * 8, [0, 0, 0, 0, 1, 1, 1, 1], [(True, False, False)] * 8, [()] * 8,
        all_pairs(8, 1200), all_pairs(8, 12),
    ),
    "hgx-h100": (
        [H100] * 8, [0] * 4 + [1] * 4, [(True, False, False)] * 8, [()] * 8,
        all_pairs(8, 1800), all_pairs(8, 18),
    ),
    "h200": (
        [H200] * 8, [0] * 4 + [1] * 4, [(True, False, False)] * 8, [()] * 8,
        all_pairs(8, 1800), all_pairs(8, 18),
    ),
    "a30x4": (
        [A30] * 4, [0, 0, 1, 1],
        [(True, True, True), (True, True, True), (True, False, True), (True, False, False)],
        [("1g.6gb",) * 4, (), (), ()],
        ((0, 400, 10, 10), (400, 0, 10, 10), (10, 10, 0, 400), (10, 10, 400, 0)),
        ((0, 4, 0, 0), (4, 0, 0, 0), (0, 0, 0, 4), (0, 0, 4, 0)),
    ),
    "mixed": (
        [A100_80P, A100_80P, L4, L4], [0, 0, 1, 1],
        [(True, True, True), (True, True, True), (False, False, False), (False, False, False)],
        [("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"), ("3g.40gb", "3g.40gb"), (), ()],
        ((0, 50, 10, 10), (50, 0, 10, 10), (10, 10, 0, 20), (10, 10, 20, 0)),
        all_pairs(4, 0),
    ),
    "laptop": (
        [LAPTOP], [None], [(False, False, False)], [()], ((0,),), ((0,),),
    ),
}  # fmt: skip


def test_every_shipped_node_has_a_description_test() -> None:
    assert sorted(NODES) == shipped_nodes()


@pytest.mark.parametrize("node", [pytest.param(n, id=n) for n in NODES])
def test_inventory_matches_node_description(inventory_of, node: str) -> None:
    cards, numa, mig_modes, profiles, scores, nvlinks = NODES[node]
    inventory = inventory_of(node)
    assert [g.index for g in inventory.gpus] == list(range(len(cards)))
    for gpu, card, numa_node, mode, mig_profiles in zip(
        inventory.gpus, cards, numa, mig_modes, profiles, strict=True
    ):
        name, memory_mib, cc, pci_id = card
        assert (gpu.name, gpu.memory_mib, gpu.cuda_compute_capability) == (name, memory_mib, cc)
        assert gpu.pci_device_id == pci_id
        assert gpu.numa_node == numa_node
        assert (gpu.mig_capable, gpu.mig_enabled, gpu.mig_pending) == mode
        assert tuple(m.profile for m in gpu.mig_devices) == mig_profiles
        assert gpu.uuid.startswith("GPU-")
        assert gpu.minor == gpu.index
        assert not gpu.lost
    assert inventory.link_scores == scores
    assert inventory.nvlink_counts == nvlinks
    assert len({g.uuid for g in inventory.gpus}) == len(cards)


def test_dgx_a100_identity_fields(inventory_of) -> None:
    inventory = inventory_of("dgx-a100")
    buses = [g.pci_bus_id for g in inventory.gpus]
    assert buses[:2] == ["00000000:07:00.0", "00000000:0F:00.0"]
    assert inventory.driver_version == "550.54.15"
    assert inventory.cuda_driver_version == 12040
    assert all(g.compute_mode is ComputeMode.DEFAULT for g in inventory.gpus)
    assert inventory.gpu_by_uuid(inventory.gpus[5].uuid) is inventory.gpus[5]


def test_uuids_are_stable_across_state_directories(inventory_of) -> None:
    first, second = inventory_of("mixed"), inventory_of("mixed")
    assert [g.uuid for g in first.gpus] == [g.uuid for g in second.gpus]
    assert [m.uuid for m in first.gpus[0].mig_devices] == [
        m.uuid for m in second.gpus[0].mig_devices
    ]


def test_mig_device_fields_on_mixed_node(inventory_of) -> None:
    gpu = inventory_of("mixed").gpus[0]
    by_profile = {(m.profile, m.placement_start): m for m in gpu.mig_devices}
    big = by_profile[("3g.40gb", 4)]
    assert (big.gi_id, big.ci_id, big.placement_size) == (2, 0, 4)
    assert (big.memory_mib, big.multiprocessor_count) == (39936, 42)
    assert big.uuid.startswith("MIG-")
    assert big.parent_uuid == gpu.uuid
    assert big.parent_index == 0
    assert [m.index for m in gpu.mig_devices] == [0, 1, 2, 3]
    assert [m.gi_id for m in gpu.mig_devices] == [2, 4, 7, 8]
    small = by_profile[("1g.10gb", 1)]
    # mig-minors: 3 + gpu_minor*135 + gi*9 (GI access), +1+ci (CI access)
    assert (small.gi_cap_minor, small.ci_cap_minor) == (3 + 8 * 9, 3 + 8 * 9 + 1)


def test_processes_on_gpu_and_mig_device(sim_nvml) -> None:
    nvml, state = sim_nvml("mixed")
    on_l4 = start_process(state, 2)
    on_mig = start_process(state, 1, gi=1, ci=0)
    inventory = read_inventory(nvml)
    assert inventory.gpus[2].processes == (on_l4,)
    assert inventory.gpus[1].processes == (on_mig,)
    assert inventory.gpus[1].mig_devices[0].processes == (on_mig,)
    assert inventory.gpus[1].mig_devices[1].processes == ()


def test_compute_mode_is_read_back(sim_nvml) -> None:
    nvml, _ = sim_nvml("dgx-a100")
    set_compute_mode(nvml, 4, ComputeMode.EXCLUSIVE_PROCESS)
    inventory = read_inventory(nvml)
    assert inventory.gpus[4].compute_mode is ComputeMode.EXCLUSIVE_PROCESS
    assert inventory.gpus[3].compute_mode is ComputeMode.DEFAULT


def test_lost_gpu_is_a_fact_not_an_exception(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    healthy = read_inventory(nvml)
    lose_gpu(state, 3)
    inventory = read_inventory(nvml)
    lost = inventory.gpus[3]
    assert lost.lost
    assert "GPU_IS_LOST" in lost.lost_reason
    assert (lost.uuid, lost.pci_bus_id) == (healthy.gpus[3].uuid, healthy.gpus[3].pci_bus_id)
    assert not any(g.lost for g in inventory.gpus if g.index != 3)
    assert inventory.link_scores[3] == (0,) * 8
    assert inventory.link_scores[2][4] == 1200
    reset_gpu(state, 3)
    assert read_inventory(nvml).gpus[3] == healthy.gpus[3]


def test_lost_gpu_keeps_what_the_previous_inventory_knew(sim_nvml) -> None:
    nvml, state = sim_nvml("mixed")
    previous = read_inventory(nvml)
    lose_gpu(state, 0)
    lost = read_inventory(nvml, previous=previous).gpus[0]
    assert lost.lost
    assert lost.memory_mib == 81920
    assert lost.numa_node == 0
    assert [m.uuid for m in lost.mig_devices] == [m.uuid for m in previous.gpus[0].mig_devices]
    without_previous = read_inventory(nvml).gpus[0]
    assert without_previous.lost
    assert without_previous.memory_mib == 0
    assert without_previous.mig_devices == ()


def test_numa_nodes_come_from_the_injected_reader(sim_nvml) -> None:
    nvml, _ = sim_nvml("dgx-a100")
    inventory = read_inventory(
        nvml, numa_reader=lambda bus_id: 3 if bus_id.endswith("BD:00.0") else None
    )
    assert [g.numa_node for g in inventory.gpus] == [None] * 7 + [3]
    assert numa_reader_for(nvml.lib)("00000000:07:00.0") == 0


PCIE_NODE = """\
name: pcie
gpus:
  - {model: L4, bus_id: "00000000:01:00.0", numa_node: 0, board: b0, pcie_path: [hb0, sw0, sw1]}
  - {model: L4, bus_id: "00000000:02:00.0", numa_node: 0, board: b0, pcie_path: [hb0, sw0, sw1]}
  - {model: L4, bus_id: "00000000:03:00.0", numa_node: 0, pcie_path: [hb0, sw0, sw2]}
  - {model: L4, bus_id: "00000000:04:00.0", numa_node: 0, pcie_path: [hb0, sw3]}
  - {model: L4, bus_id: "00000000:05:00.0", numa_node: 0, pcie_path: [hb0, sw3]}
  - {model: L4, bus_id: "00000000:06:00.0", numa_node: 0, pcie_path: [hb1]}
  - {model: L4, bus_id: "00000000:07:00.0", numa_node: 1, pcie_path: [hb2]}
"""


@pytest.mark.parametrize(
    ("a", "b", "score"),
    [pytest.param(0, 1, 60, id="same board"),
     pytest.param(3, 4, 50, id="single PCIe switch"),
     pytest.param(0, 2, 40, id="multiple PCIe switches"),
     pytest.param(0, 3, 30, id="host bridge"),
     pytest.param(0, 5, 20, id="same CPU"),
     pytest.param(0, 6, 10, id="across CPUs")],
)  # fmt: skip
def test_pcie_relation_scores_without_nvlink(sim_nvml, tmp_path, a: int, b: int, score) -> None:
    node = tmp_path / "pcie.yaml"
    node.write_text(PCIE_NODE)
    nvml, _ = sim_nvml(node)
    inventory = read_inventory(nvml)
    assert inventory.link_scores[a][b] == inventory.link_scores[b][a] == score
    assert inventory.nvlink_counts[a][b] == 0


class _FailingOn:
    """The simulated library, but `function` raises `code` for every handle of GPU `gpu`."""

    def __init__(self, lib: SimNvml, function: str, gpu: int, code: int) -> None:
        self._lib, self._function, self._gpu, self._code = lib, function, gpu, code
        self.host_root = lib.host_root

    def __getattr__(self, name: str):
        real = getattr(self._lib, name)
        if name != self._function:
            return real

        def failing(*args):
            target = args[0] if isinstance(args[0], int) else handles.decode_device(args[0]).gpu
            if target == self._gpu:
                raise pynvml.NVMLError(self._code)
            return real(*args)

        return failing


READ_FUNCTIONS = """
nvmlDeviceGetHandleByIndex nvmlDeviceGetUUID nvmlDeviceGetPciInfo nvmlDeviceGetMemoryInfo
nvmlDeviceGetCudaComputeCapability nvmlDeviceGetMigMode nvmlDeviceGetComputeMode
nvmlDeviceGetComputeRunningProcesses nvmlDeviceGetMaxMigDeviceCount
nvmlDeviceGetMigDeviceHandleByIndex nvmlDeviceGetGpuInstanceProfileInfo
nvmlDeviceGetGpuInstanceById nvmlDeviceGetAttributes nvmlDeviceGetGpuInstanceId
""".split()


@pytest.mark.parametrize(
    "code",
    [pytest.param(pynvml.NVML_ERROR_GPU_IS_LOST, id="GPU_IS_LOST"),
     pytest.param(pynvml.NVML_ERROR_UNKNOWN, id="UNKNOWN")],
)  # fmt: skip
@pytest.mark.parametrize("function", READ_FUNCTIONS)
def test_a_gpu_failing_any_read_is_a_lost_fact(sim_state, function: str, code: int) -> None:
    lib = _FailingOn(SimNvml(sim_state("mixed")), function, 0, code)
    nvml = Nvml(lib, host_root=lib.host_root)
    nvml.init()
    inventory = read_inventory(nvml)
    assert inventory.gpus[0].lost
    assert not any(g.lost for g in inventory.gpus[1:])
    assert inventory.link_scores[1][2] == 10
