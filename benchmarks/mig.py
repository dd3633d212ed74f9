"""MIG measurements, in-process on a simulated dgx-a100 (8x A100-SXM4-40GB).

`mig plan`: plan_mig of every config of configs/mig-parted.yaml (the mig-parted example), on a
node that already carries a mixed layout (custom-config: four GPUs off, four partitioned), so each
plan reads every GPU's instances and diffs them. `mig apply`: plan_mig + apply_mig of the fullest
layout (all-1g.5gb: 8 mode changes, 56 GPU and 56 compute instances, each step journalled) on a
fresh node.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.stats import Figure
from sharing.mig import parse_mig_parted
from sharing.nvml import Nvml
from sharing.nvml.mig_apply import apply_mig, plan_mig
from sharing.nvml.sim import SimNvml, create_state

NODE = "dgx-a100"
MIG_FILE = Path(__file__).resolve().parent.parent / "configs" / "mig-parted.yaml"


def _fresh(root: Path, name: str) -> Nvml:
    nvml = Nvml(SimNvml(create_state(NODE, root / name)))
    nvml.init()
    return nvml


def plan_configs(runs: int) -> list[Figure]:
    """plan_mig of each example config (file read and parsed each time); the slowest config's
    figures, every config's median in the detail."""
    root = Path(tempfile.mkdtemp(prefix="gpb-mig-", dir="/tmp"))
    try:
        nvml = _fresh(root, "node")
        apply_mig(nvml, plan_mig(nvml, MIG_FILE, "custom-config"), journal_path=root / "j.json")
        names = parse_mig_parted(MIG_FILE.read_text()).names
        samples: dict[str, list[float]] = {}
        for name in names:
            samples[name] = []
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                plan_mig(nvml, MIG_FILE, name)
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
        nvml.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    slowest = max(medians, key=medians.__getitem__)
    detail = "median per config: " + ", ".join(f"{n} {m:.1f}" for n, m in medians.items())
    return [
        Figure.from_samples(
            f"mig plan, slowest of the {len(names)} example configs ({slowest})",
            f"{NODE} (8 GPUs)", "ms", samples[slowest], target_median=50.0,
            target_text="<50 each", detail=f"{detail} ms",
        )
    ]  # fmt: skip


def apply_full(runs: int) -> list[Figure]:
    """plan_mig + apply_mig of all-1g.5gb on a fresh node: 120 journalled NVML mutations."""
    samples = []
    mutations = 0
    for i in range(runs):
        root = Path(tempfile.mkdtemp(prefix="gpb-mig-", dir="/tmp"))
        try:
            nvml = _fresh(root, f"node{i}")
            t0 = time.perf_counter_ns()
            result = apply_mig(nvml, plan_mig(nvml, MIG_FILE, "all-1g.5gb"),
                               journal_path=root / "j.json")  # fmt: skip
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            mutations = result.mutations
            nvml.shutdown()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return [
        Figure.from_samples(
            "mig apply all-1g.5gb (plan + apply, journalled)", f"{NODE} (8 GPUs)", "ms", samples,
            target_median=1000.0, target_text="<1000",
            detail=f"{mutations} NVML mutations, each journalled before and after",
        )
    ]  # fmt: skip
