"""`gpushare demo` runs its whole walkthrough and exits 0."""

from __future__ import annotations

import io
import re
from pathlib import Path

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
