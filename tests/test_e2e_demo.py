"""`gpushare demo` runs its whole walkthrough and exits 0."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.cli.demo import run_demo


def test_demo_walkthrough() -> None:
    """Registration with device counts, an allocation, a fault at the kubelet, a clean stop."""
    out = io.StringIO()
    assert run_demo(node="dgx-a100", out=out) == 0
    text = out.getvalue()
    assert "nvidia.com/gpu               gpushare-gpu.sock                   32      32" in text
    assert "env NVIDIA_VISIBLE_DEVICES=GPU-" in text
    assert "unhealthy: XID 79 (GPU has fallen off the bus)" in text  # the daemon's own log
    assert "the kubelet's next list: 28 of 32 Healthy" in text
    assert "left behind: none" in text
    assert text.rstrip().endswith("demo complete.")


def test_demo_with_an_mps_config_keeps_mps_in_its_own_directory() -> None:
    """An MPS config naming /run/nvidia/mps: the control daemon's pipes go to the demo's dir."""
    config = Path(__file__).resolve().parents[1] / "configs" / "mps.yaml"
    assert "mpsRoot: /run/nvidia/mps" in config.read_text()
    out = io.StringIO()
    assert run_demo(node="dgx-a100", config=config, out=out) == 0
    text = out.getvalue()
    assert "MPS control daemon answers" in text
    assert "env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25" in text
    pipe_mount = re.search(r"mount (\S+) -> /mps/gpu/pipe", text)
    assert pipe_mount is not None
    assert pipe_mount.group(1).startswith("/tmp/gpushare-demo-")
    assert "MPS control daemon stopped" in text
    assert text.rstrip().endswith("demo complete.")


ROOT = Path(__file__).resolve().parents[1]


def _demo_dirs() -> set[Path]:
    """Directories of `gpushare demo` runs (not of `demo --mig`, whose tests may run meanwhile
    in another worker; this file's tests run one after another)."""
    return {p for p in Path("/tmp").glob("gpushare-demo-*") if not p.name.startswith(
        "gpushare-demo-mig-")}


@pytest.mark.parametrize(
    ("config", "lines"),
    [
        pytest.param(None, 1, id="default config, cut in the config listing"),
        pytest.param("mps.yaml", 20, id="MPS config, cut while the daemon runs"),
    ],
)
def test_demo_piped_into_head_ends_quietly(config: str | None, lines: int) -> None:
    """`gpushare demo | head -N`: exit 0 within seconds, no traceback, no directory left."""
    before = _demo_dirs()
    argv = [sys.executable, "-m", "plugin.cli", "demo"]
    if config:
        argv += ["--config", str(ROOT / "configs" / config)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None
    read = [process.stdout.readline() for _ in range(lines)]
    process.stdout.close()  # what head does after its last line
    try:
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert len(read) == lines
    assert read[0].startswith(b"gpushare demo: simulated node dgx-a100")
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr
    assert _demo_dirs() <= before
