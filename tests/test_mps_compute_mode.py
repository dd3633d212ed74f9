"""--mps-compute-mode manage|leave: who owns the GPUs' compute mode while MPS daemons run.

The simulated NVML is injected with a recorder of `nvmlDeviceSetComputeMode` (a subclass, the
call still reaches the simulated GPU), so the tests count calls at the pynvml boundary.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from mps_daemon import MpsSupervisor
from plugin.cli import build_parser
from plugin.cli.run import mps_compute_mode
from plugin.daemon.core import Daemon
from sharing.devices import ComputeMode
from sharing.errors import ConfigError
from sharing.nvml import Nvml, read_inventory, set_compute_mode
from sharing.nvml.sim import SimNvml
from tests.checkout import checkout_env, gpushare_argv
from tests.fakes.kubelet import FakeKubelet

MPS_ON_0_1 = """\
version: v1
sharing:
  mps:
    resources:
      - {name: nvidia.com/gpu, rename: nvidia.com/mps-a, devices: [0, 1], replicas: 4}
"""
EXCLUSIVE = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
DEFAULT = pynvml.NVML_COMPUTEMODE_DEFAULT


class RecordingSimNvml(SimNvml):
    """The simulated NVML, recording every compute-mode change asked of it: (GPU, mode)."""

    def __init__(self, state_dir: str | Path) -> None:
        super().__init__(state_dir)
        self.set_calls: list[tuple[int, int]] = []

    def nvmlDeviceSetComputeMode(self, handle: object, mode: int) -> None:  # noqa: N802
        self.set_calls.append((self.nvmlDeviceGetIndex(handle), mode))
        super().nvmlDeviceSetComputeMode(handle, mode)


def _modes(state: Path) -> list[ComputeMode]:
    nvml = Nvml(SimNvml(state))
    nvml.init()
    try:
        return [g.compute_mode for g in read_inventory(nvml).gpus]
    finally:
        nvml.shutdown()


@pytest.fixture
def run_daemon(
    tmp_path: Path, kubelet_dir: Path, mps_root: Path, sim_state: Callable[..., Path]
) -> Iterator[Callable[..., tuple[Daemon, RecordingSimNvml, Path]]]:
    """Start a Daemon with MPS on GPUs 0 and 1 of a simulated DGX A100; stopped after."""
    daemons: list[Daemon] = []

    def start(state: Path | None = None, **kwargs: object) -> tuple[Daemon, RecordingSimNvml, Path]:
        state = state or sim_state("dgx-a100")
        config = tmp_path / "config.yaml"
        config.write_text(MPS_ON_0_1)
        lib = RecordingSimNvml(state)
        daemon = Daemon(config_path=config, kubelet_dir=kubelet_dir, nvml_lib=lib, env={},
                        overrides={"mps-root": str(mps_root)}, config_poll_s=3600, **kwargs)
        daemons.append(daemon)
        daemon.start()
        return daemon, lib, state

    yield start
    for daemon in daemons:
        daemon.stop()


def test_manage_sets_exclusive_process_and_restores_default(
    run_daemon, kubelet: FakeKubelet
) -> None:
    daemon, lib, state = run_daemon()
    kubelet.wait_for_list("nvidia.com/mps-a", lambda d: len(d.healthy_ids) == 8)
    assert lib.set_calls == [(0, EXCLUSIVE), (1, EXCLUSIVE)]
    assert _modes(state)[:3] == [ComputeMode.EXCLUSIVE_PROCESS] * 2 + [ComputeMode.DEFAULT]
    daemon.stop()
    assert lib.set_calls[2:] == [(0, DEFAULT), (1, DEFAULT)]
    assert _modes(state) == [ComputeMode.DEFAULT] * 8


def test_manage_leaves_a_gpu_already_exclusive_alone(run_daemon, sim_state) -> None:
    """A GPU found in EXCLUSIVE_PROCESS is neither set nor restored (its mode was not ours)."""
    state = sim_state("dgx-a100")
    nvml = Nvml(SimNvml(state))
    nvml.init()
    set_compute_mode(nvml, 1, ComputeMode.EXCLUSIVE_PROCESS)
    nvml.shutdown()
    daemon, lib, _ = run_daemon(state=state)
    assert lib.set_calls == [(0, EXCLUSIVE)]
    daemon.stop()
    assert lib.set_calls == [(0, EXCLUSIVE), (0, DEFAULT)]
    assert _modes(state)[:2] == [ComputeMode.DEFAULT, ComputeMode.EXCLUSIVE_PROCESS]


def test_leave_never_calls_the_setter(
    run_daemon, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpushare.mps")
    daemon, lib, state = run_daemon(mps_compute_mode="leave")
    kubelet.wait_for_list("nvidia.com/mps-a", lambda d: len(d.healthy_ids) == 8)
    assert daemon.mps_supervisor.healthy() == {"nvidia.com/mps-a": True}
    daemon.stop()
    assert lib.set_calls == []
    assert _modes(state) == [ComputeMode.DEFAULT] * 8
    assert any("compute mode left as it is (policy leave): GPU 0 DEFAULT, GPU 1 DEFAULT"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        pytest.param(None, {}, "manage", id="default manage"),
        pytest.param("leave", {}, "leave", id="flag"),
        pytest.param(None, {"MPS_COMPUTE_MODE": "leave"}, "leave", id="environment"),
        pytest.param("manage", {"MPS_COMPUTE_MODE": "leave"}, "manage", id="flag wins over env"),
        pytest.param(None, {"MPS_COMPUTE_MODE": ""}, "manage", id="empty env is unset"),
    ],
)
def test_compute_mode_precedence(flag: str | None, env: dict[str, str], expected: str) -> None:
    assert mps_compute_mode(flag, env) == expected


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MPS_COMPUTE_MODE: must be manage or leave, got 'off'"):
        mps_compute_mode(None, {"MPS_COMPUTE_MODE": "off"})


def test_supervisor_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="must be manage or leave, got 'sometimes'"):
        MpsSupervisor(control_binary="x", down=lambda *_: None, up=lambda _: None,
                      compute_mode="sometimes")


def test_bad_flag_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--mps-compute-mode", "off"])
    assert "invalid choice: 'off'" in capsys.readouterr().err


def test_run_with_leave_from_the_environment_keeps_compute_modes(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, sim_state, mps_root: Path
) -> None:
    """`MPS_COMPUTE_MODE=leave gpushare run`: the MPS daemon serves, no GPU changes mode."""
    state = sim_state("dgx-a100")
    config = tmp_path / "config.yaml"
    config.write_text(MPS_ON_0_1)
    process = subprocess.Popen(
        gpushare_argv("run", "--config", str(config), "--node", str(state),
                      "--kubelet-dir", str(kubelet_dir), "--mps-root", str(mps_root)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=checkout_env({"MPS_COMPUTE_MODE": "leave"}),
    )
    try:
        kubelet.wait_for_list("nvidia.com/mps-a", lambda d: len(d.healthy_ids) == 8, timeout_s=20)
        assert _modes(state) == [ComputeMode.DEFAULT] * 8
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, output
    assert "compute mode left as it is (policy leave)" in output


def test_run_with_a_bad_environment_value_exits_with_the_reason(tmp_path: Path) -> None:
    done = subprocess.run(
        gpushare_argv("run", "--node", "laptop", "--kubelet-dir", str(tmp_path)),
        cwd=tmp_path, env=checkout_env({"MPS_COMPUTE_MODE": "sometimes"}),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2  # a config error (gpushare run --help: exit status)
    assert "MPS_COMPUTE_MODE: must be manage or leave, got 'sometimes'" in done.stderr
