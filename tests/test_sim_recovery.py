"""The GPU recovery action field: the simulated nvmlDeviceGetFieldValues and the adapter's read."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest

from plugin.cli import main
from sharing.errors import GpuLost, NvmlError
from sharing.nvml import NODES_DIR, Nvml
from sharing.nvml.recovery import FIELD_RECOVERY_ACTION, recovery_action_name
from sharing.nvml.sim import SimNvml, inject_event, inject_xid, lose_gpu, reset_gpu, show
from sharing.nvml.sim.recovery import RESET_REQUIRED_XIDS
from sharing.nvml.sim.state import StateStore

GPU = 2
ECC_CURRENT = pynvml.NVML_FI_DEV_ECC_CURRENT  # a field the simulator does not report


def xid(code: int) -> Callable[[Path], object]:
    """Inject XID `code` on GPU 2."""
    return lambda state: inject_xid(state, GPU, code)


def double_bit_ecc(state: Path) -> object:
    """A double-bit ECC event on GPU 2."""
    return inject_event(state, GPU, pynvml.nvmlEventTypeDoubleBitEccError, 0)


def old_driver(tmp_path: Path) -> Path:
    """dgx-a100 with a driver that does not report the recovery action field."""
    path = tmp_path / "old-driver.yaml"
    path.write_text((NODES_DIR / "dgx-a100.yaml").read_text() + "recovery_action_field: false\n")
    return path


def field_values(lib: SimNvml, fields: list) -> ctypes.Array:
    """nvmlDeviceGetFieldValues on GPU 2."""
    return lib.nvmlDeviceGetFieldValues(lib.nvmlDeviceGetHandleByIndex(GPU), fields)


@pytest.fixture
def lib(sim_state: Callable[..., Path]) -> SimNvml:
    """An initialised simulated library on dgx-a100."""
    library = SimNvml(sim_state("dgx-a100"))
    library.nvmlInit()
    return library


def test_reset_xids_are_the_catalog_ones() -> None:
    assert RESET_REQUIRED_XIDS == {48, 79, 95}


def test_field_values_have_the_pynvml_shape(lib: SimNvml) -> None:
    values = field_values(lib, [FIELD_RECOVERY_ACTION, (ECC_CURRENT, 3)])
    assert isinstance(values, ctypes.Array)
    assert values._type_ is pynvml.c_nvmlFieldValue_t
    assert len(values) == 2
    action, ecc = values
    assert (action.fieldId, action.scopeId, action.nvmlReturn, action.valueType) == (
        FIELD_RECOVERY_ACTION, 0, pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    )
    assert action.value.uiVal == pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    assert action.timestamp > 0
    assert (ecc.fieldId, ecc.scopeId, ecc.nvmlReturn) == (
        ECC_CURRENT, 3, pynvml.NVML_ERROR_NOT_SUPPORTED
    )


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        pytest.param(xid(48), pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, id="XID 48"),
        pytest.param(xid(79), pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, id="XID 79"),
        pytest.param(xid(95), pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, id="XID 95"),
        pytest.param(double_bit_ecc, pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, id="DBE"),
        pytest.param(xid(94), pynvml.NVML_GPU_RECOVERY_ACTION_NONE, id="XID 94 contained"),
        pytest.param(xid(43), pynvml.NVML_GPU_RECOVERY_ACTION_NONE, id="XID 43 application"),
        pytest.param(xid(74), pynvml.NVML_GPU_RECOVERY_ACTION_NONE, id="XID 74 NVLink"),
    ],
)
def test_fault_then_reset(lib: SimNvml, fault: Callable[[Path], object], expected: int) -> None:
    """A fault sets the GPU's recovery action (other GPUs keep none); a reset sets it to none."""
    fault(lib.state_dir)
    [value] = field_values(lib, [FIELD_RECOVERY_ACTION])
    assert (value.nvmlReturn, value.value.uiVal) == (pynvml.NVML_SUCCESS, expected)
    neighbour = lib.nvmlDeviceGetHandleByIndex(GPU + 1)
    other = lib.nvmlDeviceGetFieldValues(neighbour, [FIELD_RECOVERY_ACTION])
    assert other[0].value.uiVal == pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    reset_gpu(lib.state_dir, GPU)
    [value] = field_values(lib, [FIELD_RECOVERY_ACTION])
    assert value.value.uiVal == pynvml.NVML_GPU_RECOVERY_ACTION_NONE


def test_lost_gpu_needs_a_reset(lib: SimNvml) -> None:
    """A lost GPU (even without an XID) records GPU_RESET and answers GPU_IS_LOST until reset."""
    lose_gpu(lib.state_dir, GPU, xid=None)
    assert StateStore(lib.state_dir).read()["gpus"][GPU]["recovery_action"] == 1
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        field_values(lib, [FIELD_RECOVERY_ACTION])
    reset_gpu(lib.state_dir, GPU)
    assert field_values(lib, [FIELD_RECOVERY_ACTION])[0].value.uiVal == 0


def test_driver_without_the_field(sim_state: Callable[..., Path], tmp_path: Path) -> None:
    """A node whose driver lacks the field: the call succeeds, the value says NOT_SUPPORTED."""
    lib = SimNvml(sim_state(old_driver(tmp_path)))
    lib.nvmlInit()
    inject_xid(lib.state_dir, GPU, 48)
    [value] = field_values(lib, [FIELD_RECOVERY_ACTION])
    assert (value.fieldId, value.nvmlReturn) == (
        FIELD_RECOVERY_ACTION, pynvml.NVML_ERROR_NOT_SUPPORTED
    )
    assert "recovery action not reported by the driver (would be gpu_reset)" in show(lib.state_dir)


def test_mig_device_handle_does_not_report_it(sim_state: Callable[..., Path]) -> None:
    lib = SimNvml(sim_state("mixed"))
    lib.nvmlInit()
    mig = lib.nvmlDeviceGetMigDeviceHandleByIndex(lib.nvmlDeviceGetHandleByIndex(0), 0)
    [value] = lib.nvmlDeviceGetFieldValues(mig, [FIELD_RECOVERY_ACTION])
    assert value.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED


# -- the adapter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "name"),
    [(0, "none"), (1, "gpu_reset"), (2, "node_reboot"), (3, "drain_p2p"),
     (4, "drain_and_reset"), (99, "recovery action 99")],
)  # fmt: skip
def test_action_names(action: int, name: str) -> None:
    assert recovery_action_name(action) == name


def test_adapter_reads_the_action(sim_nvml: Callable[..., tuple[Nvml, Path]]) -> None:
    nvml, state = sim_nvml("dgx-a100")
    assert nvml.recovery_action(GPU) == "none"
    inject_xid(state, GPU, 95)
    assert [nvml.recovery_action(i) for i in (GPU - 1, GPU)] == ["none", "gpu_reset"]
    reset_gpu(state, GPU)
    assert nvml.recovery_action(GPU) == "none"
    lose_gpu(state, GPU)
    with pytest.raises(GpuLost, match="nvmlDeviceGetFieldValues: NVML_ERROR_GPU_IS_LOST"):
        nvml.recovery_action(GPU)


def test_adapter_none_when_not_reported(
    sim_nvml: Callable[..., tuple[Nvml, Path]], tmp_path: Path
) -> None:
    """Unsupported by the driver, or a library without the function: None, not an error."""
    nvml, state = sim_nvml(old_driver(tmp_path))
    inject_xid(state, GPU, 48)
    assert nvml.recovery_action(GPU) is None

    class OlderLibrary(SimNvml):
        """A library without nvmlDeviceGetFieldValues."""

        nvmlDeviceGetFieldValues = None

    older = Nvml(OlderLibrary(state))
    older.init()
    assert older.recovery_action(GPU) is None
    older.shutdown()


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        pytest.param(pynvml.NVML_ERROR_NOT_SUPPORTED, None, id="NOT_SUPPORTED: not reported"),
        pytest.param(pynvml.NVML_ERROR_INVALID_ARGUMENT, None, id="unknown field: not reported"),
        pytest.param(pynvml.NVML_ERROR_GPU_IS_LOST, GpuLost, id="GPU_IS_LOST: GpuLost"),
        pytest.param(pynvml.NVML_ERROR_TIMEOUT, NvmlError, id="TIMEOUT: NvmlError"),
    ],
)
def test_adapter_maps_the_value_return_code(
    sim_nvml: Callable[..., tuple[Nvml, Path]], code: int, outcome: type | None
) -> None:
    """A field value's own return code is mapped like a call's."""
    _, state = sim_nvml("dgx-a100")

    class Answering(SimNvml):
        """A library whose field values all answer `code`."""

        def nvmlDeviceGetFieldValues(self, handle: object, fieldIds: list) -> ctypes.Array:
            values = super().nvmlDeviceGetFieldValues(handle, fieldIds)
            for value in values:
                value.nvmlReturn = code
            return values

    nvml = Nvml(Answering(state))
    nvml.init()
    if outcome is None:
        assert nvml.recovery_action(GPU) is None
    else:
        with pytest.raises(outcome, match=r"nvmlDeviceGetFieldValues\(recovery action\)"):
            nvml.recovery_action(GPU)
    nvml.shutdown()


def test_sim_show_prints_the_action(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = tmp_path / "node"
    assert main(["sim", "create", "dgx-a100", "--state", str(state)]) == 0
    assert main(["sim", "inject-xid", "--node", str(state), "--gpu", "2", "--xid", "48"]) == 0
    capsys.readouterr()
    assert main(["sim", "show", "--node", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("GPU 2 ")
    assert lines[3].endswith("recovery action gpu_reset")
    assert lines[2].endswith("recovery action none")
    assert main(["sim", "reset", "--node", str(state), "--gpu", "2"]) == 0
    capsys.readouterr()
    assert main(["sim", "show", "--node", str(state)]) == 0
    assert capsys.readouterr().out.splitlines()[3].endswith("recovery action none")
