"""NVML that cannot be initialised: flags.failOnInitError decides between exiting and idling."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from plugin.cli import main
from plugin.daemon.core import Daemon
from sharing.nvml import load_library
from tests.fakes.kubelet import FakeKubelet

BROKEN_NODE = (
    "name: broken\ninit_error: DRIVER_NOT_LOADED\n"
    'gpus:\n  - {model: L4, bus_id: "00000000:01:00.0"}\n'
)
CONFIG = "version: v1\nflags:\n  failOnInitError: {value}\n"


@pytest.fixture
def broken_node(tmp_path: Path) -> Path:
    node = tmp_path / "broken.yaml"
    node.write_text(BROKEN_NODE)
    return node


def test_fail_on_init_error_exits_with_the_nvml_error(
    tmp_path: Path, broken_node: Path, kubelet_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(value="true"))
    status = main(["run", "--config", str(config), "--node", str(broken_node),
                   "--kubelet-dir", str(kubelet_dir)])  # fmt: skip
    assert status == 1
    assert "DRIVER_NOT_LOADED" in capsys.readouterr().err
    assert list(kubelet_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        pytest.param("LIBRARY_NOT_FOUND", "libnvidia-ml.so.1 not found: is the NVIDIA driver"
                     " installed, and does the container run with the NVIDIA runtime", id="no lib"),
        pytest.param("DRIVER_NOT_LOADED", "the NVIDIA kernel driver is not loaded", id="no driver"),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_nvml_init_failure_says_what_to_check(
    tmp_path: Path, kubelet_dir: Path, capsys: pytest.CaptureFixture[str], code: str, hint: str,
    command: str,
) -> None:
    """One line: the NVML error and what an operator checks for it; exit 1."""
    node = tmp_path / "node.yaml"
    node.write_text(BROKEN_NODE.replace("DRIVER_NOT_LOADED", code))
    extra = ["--kubelet-dir", str(kubelet_dir)] if command == "run" else []
    assert main([command, "--node", str(node), *extra]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert f"NVML init failed: nvmlInit: NVML_ERROR_{code} ({hint}" in line


@pytest.mark.parametrize(
    ("file_value", "overrides"),
    [
        pytest.param("false", {}, id="file says false"),
        pytest.param("true", {"fail-on-init-error": False}, id="flag wins over the file"),
    ],
)
def test_without_fail_on_init_error_the_daemon_stays_up_serving_nothing(
    tmp_path: Path,
    broken_node: Path,
    kubelet: FakeKubelet,
    kubelet_dir: Path,
    caplog: pytest.LogCaptureFixture,
    file_value: str,
    overrides: dict[str, object],
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(value=file_value))
    daemon = Daemon(
        config_path=config, kubelet_dir=kubelet_dir, nvml_lib=load_library(str(broken_node)),
        env={}, overrides=overrides,
    )  # fmt: skip
    with caplog.at_level(logging.ERROR):
        daemon.start()
    try:
        assert daemon.plan.resources == ()
        assert sorted(p.name for p in kubelet_dir.iterdir()) == ["kubelet.sock"]
        assert kubelet.registrations == []
        assert "NVML unavailable" in caplog.text
        assert "DRIVER_NOT_LOADED" in caplog.text
    finally:
        daemon.stop()
