"""`gpushare demo --mig` runs its whole walkthrough and exits 0."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from plugin.cli.demo_mig import run_mig_demo

ROOT = Path(__file__).resolve().parents[1]


def test_mig_demo_walkthrough() -> None:
    """A requested job swaps nvidia.com/gpu for 56 MIG devices, a blocked one changes nothing,
    a scheduled one gives the balanced layout, and the status lists all three."""
    out = io.StringIO()
    assert run_mig_demo(node="dgx-a100", out=out) == 0
    text = out.getvalue()
    assert "    nvidia.com/gpu               8 devices,   8 Healthy" in text
    assert "job 1 success: applied all-1g.5gb" in text
    assert "the kubelet saw all 8 nvidia.com/gpu devices turn Unhealthy" in text
    assert "    nvidia.com/mig-1g.5gb       56 devices,  56 Healthy" in text
    assert "job 2 failed: drain: processes still running after 2 s: GPU 0: pid" in text
    assert "    nvidia.com/mig-2g.10gb       8 devices,   8 Healthy" in text
    assert "    nvidia.com/mig-3g.20gb       8 devices,   8 Healthy" in text
    assert "label nvidia.com/mig.config.state=success" in text
    status = text[text.index("$ gpushare mig status"):]
    assert "3    all-balanced  schedule" in status
    assert "1    all-1g.5gb    request" in status
    assert text.rstrip().endswith("demo complete.")


def test_mig_demo_refuses_a_config() -> None:
    """--mig brings its own config: --config with it is a usage error."""
    done = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "demo", "--mig", "--config", "x.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "gpushare demo: --mig brings its own config; drop --config"
