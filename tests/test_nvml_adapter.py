"""The NVML gate: error mapping, decoding, missing functions, _v2 probing, sessions, libraries."""

from __future__ import annotations

import gc
from pathlib import Path

import pynvml
import pytest

from sharing.errors import ConfigError, GpuLost, NvmlError, NvmlNotSupported, NvmlUnavailable
from sharing.nvml import (
    NODES_DIR,
    HostFiles,
    Nvml,
    find_nodes_dir,
    host_root_for,
    load_library,
    nvml_session,
    shipped_nodes,
    translate,
)
from sharing.nvml.host import sysfs_bus_id
from sharing.nvml.sim import SimNvml, lose_gpu, start_process


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param(pynvml.NVML_ERROR_GPU_IS_LOST, GpuLost, id="GPU_IS_LOST is GpuLost"),
        pytest.param(pynvml.NVML_ERROR_UNKNOWN, GpuLost, id="UNKNOWN is GpuLost"),
        pytest.param(pynvml.NVML_ERROR_NOT_SUPPORTED, NvmlNotSupported, id="NOT_SUPPORTED"),
        pytest.param(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, NvmlNotSupported, id="missing symbol"),
        pytest.param(pynvml.NVML_ERROR_UNINITIALIZED, NvmlUnavailable, id="UNINITIALIZED"),
        pytest.param(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, NvmlUnavailable, id="no library"),
        pytest.param(pynvml.NVML_ERROR_DRIVER_NOT_LOADED, NvmlUnavailable, id="no driver"),
        pytest.param(pynvml.NVML_ERROR_IN_USE, NvmlError, id="IN_USE stays NvmlError"),
        pytest.param(pynvml.NVML_ERROR_TIMEOUT, NvmlError, id="TIMEOUT stays NvmlError"),
    ],
)
def test_error_mapping(code: int, expected: type) -> None:
    err = translate(pynvml.NVMLError(code), "nvmlDeviceGetUUID")
    assert type(err) is expected
    assert err.code == code
    assert str(err).startswith("nvmlDeviceGetUUID: NVML_ERROR_")


class BytesLibrary:
    """A minimal library object answering in bytes, as old pynvml releases did."""

    def __init__(self) -> None:
        self.v2_calls = 0
        self.v1_calls = 0

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"535.104.05"

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> None:
        self.v2_calls += 1
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> str:
        self.v1_calls += 1
        return "event"


def test_gate_decodes_bytes_and_reports_missing_functions() -> None:
    nvml = Nvml(BytesLibrary(), host_root=Path("/nonexistent"))
    assert nvml.call("nvmlSystemGetDriverVersion") == "535.104.05"
    with pytest.raises(NvmlNotSupported, match="nvmlDeviceGetFanSpeed: not provided"):
        nvml.call("nvmlDeviceGetFanSpeed", None)


def test_v2_functions_are_probed_once() -> None:
    lib = BytesLibrary()
    nvml = Nvml(lib, host_root=Path("/nonexistent"))
    names = ("nvmlEventSetWait_v2", "nvmlEventSetWait")
    assert nvml.call_versioned(names, None, 10) == "event"
    assert nvml.call_versioned(names, None, 10) == "event"
    assert (lib.v2_calls, lib.v1_calls) == (1, 2)


def test_calls_before_init_are_unavailable(sim_state) -> None:
    nvml = Nvml(SimNvml(sim_state("laptop")))
    with pytest.raises(NvmlUnavailable, match="NVML_ERROR_UNINITIALIZED"):
        nvml.device_count()


def test_session_inits_once_and_shuts_down(sim_state) -> None:
    lib = SimNvml(sim_state("laptop"))
    with nvml_session(lib) as nvml:
        assert nvml.device_count() == 1
    with pytest.raises(NvmlUnavailable):
        nvml.device_count()


def test_init_failure_is_nvml_unavailable(tmp_path: Path) -> None:
    node = tmp_path / "broken.yaml"
    node.write_text(
        "name: broken\ninit_error: DRIVER_NOT_LOADED\n"
        'gpus:\n  - {model: L4, bus_id: "00000000:01:00.0"}\n'
    )
    with pytest.raises(NvmlUnavailable, match="NVML init failed: .*DRIVER_NOT_LOADED") as info:
        with nvml_session(load_library(str(node))):
            pass
    assert info.value.code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED


def test_probe_raises_gpu_lost(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    nvml.probe(5)
    lose_gpu(state, 5)
    with pytest.raises(GpuLost, match="GPU_IS_LOST"):
        nvml.probe(5)
    nvml.probe(4)


def test_load_library_none_is_the_real_pynvml() -> None:
    assert load_library(None) is pynvml
    assert host_root_for(pynvml) == Path("/")


def test_load_library_shipped_name_gets_a_private_state_removed_with_it() -> None:
    first, second = load_library("dgx-a100"), load_library("dgx-a100")
    assert isinstance(first, SimNvml)
    assert first.state_dir != second.state_dir
    assert host_root_for(first) == first.state_dir / "host"
    state_dir = first.state_dir
    del first
    gc.collect()
    assert not state_dir.exists()


def test_load_library_state_dir_shares_the_node(sim_state) -> None:
    state = sim_state("mixed")
    pid = start_process(state, 2)
    with nvml_session(load_library(str(state))) as nvml:
        processes = nvml.call("nvmlDeviceGetComputeRunningProcesses", nvml.handle(2))
    assert [p.pid for p in processes] == [pid]


def test_load_library_unknown_node_lists_shipped_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown node 'dgx-a200'.*dgx-a100.*laptop"):
        load_library("dgx-a200")


def test_load_library_bad_node_file_names_file_and_field(tmp_path: Path) -> None:
    node = tmp_path / "bad.yaml"
    node.write_text('name: bad\ngpus:\n  - {model: A100-SXM4-40GB, bus_id: "x"}\n')
    with pytest.raises(ConfigError, match=r'bad\.yaml: gpus\[0\]\.bus_id: .*got "x"'):
        load_library(str(node))


def test_shipped_nodes_live_in_configs_nodes() -> None:
    assert shipped_nodes() == ["a30x4", "dgx-a100", "h200", "hgx-h100", "laptop", "mixed"]
    assert NODES_DIR == Path(__file__).resolve().parents[1] / "configs" / "nodes"


def test_an_install_without_checkout_reads_the_installed_node_files(tmp_path: Path) -> None:
    """`pip install .` (no configs/ beside the package): <prefix>/share/gpushare is used."""
    checkout, prefix = tmp_path / "site-packages", tmp_path / "venv"
    checkout.mkdir()
    assert find_nodes_dir(checkout, prefix) == prefix / "share/gpushare/configs/nodes"
    (checkout / "configs" / "nodes").mkdir(parents=True)
    assert find_nodes_dir(checkout, prefix) == checkout / "configs" / "nodes"


def test_pyproject_installs_every_node_file_where_find_nodes_dir_looks() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"share/gpushare/configs/nodes" = ["configs/nodes/*.yaml"]' in pyproject


@pytest.mark.parametrize(
    ("nvml_bus", "sysfs"),
    [
        pytest.param("00000000:07:00.0", "0000:07:00.0", id="8-hex domain trimmed"),
        pytest.param("00000001:BD:00.0", "0001:bd:00.0", id="lower case"),
        pytest.param("00010000:01:00.0", "10000:01:00.0", id="wide domain kept"),
    ],
)
def test_sysfs_bus_id(nvml_bus: str, sysfs: str) -> None:
    assert sysfs_bus_id(nvml_bus) == sysfs


def test_host_files_numa_and_mig_minors(tmp_path: Path) -> None:
    devices = tmp_path / "sys/bus/pci/devices"
    (devices / "0000:07:00.0").mkdir(parents=True)
    (devices / "0000:07:00.0/numa_node").write_text("1\n")
    (devices / "0000:0f:00.0").mkdir()
    (devices / "0000:0f:00.0/numa_node").write_text("-1\n")
    minors = tmp_path / "proc/driver/nvidia-caps/mig-minors"
    minors.parent.mkdir(parents=True)
    minors.write_text("config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n")
    host = HostFiles(tmp_path)
    assert host.numa_node("00000000:07:00.0") == 1
    assert host.numa_node("00000000:0F:00.0") is None
    assert host.numa_node("00000000:47:00.0") is None
    assert (host.gi_minor(0, 1), host.ci_minor(0, 1, 0), host.gi_minor(1, 1)) == (12, 13, None)
    assert HostFiles(tmp_path / "none").mig_minors() == {}
