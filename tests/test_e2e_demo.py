"""`gpushare demo` runs its whole walkthrough and exits 0."""

from __future__ import annotations

import io

from plugin.demo import run_demo


def test_demo_walkthrough() -> None:
    """Registration with device counts, an allocation, a fault at the kubelet, a clean stop."""
    out = io.StringIO()
    assert run_demo(node="dgx-a100", out=out) == 0
    text = out.getvalue()
    assert "nvidia.com/gpu               gpushare-gpu.sock                   32      32" in text
    assert "env NVIDIA_VISIBLE_DEVICES=GPU-" in text
    assert "the kubelet's next list: 28 of 32 Healthy" in text
    assert "left behind: none" in text
    assert text.rstrip().endswith("demo complete.")
