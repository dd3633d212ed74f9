"""MIG reconfiguration job: request on the control socket -> new MIG resources at the kubelet.

The daemon runs as its own process on a simulated DGX A100 with migStrategy mixed; the request
is the one `gpushare mig reconfigure` sends (without waiting); the clock stops when the kubelet
stand-in has the first list of the new resource with every device Healthy. No process runs, so
nothing is drained. Runs alternate between two layouts, so each run changes all 8 GPUs.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.node import REPO, DaemonUnderTest
from benchmarks.stats import Figure
from plugin.daemon.control import call
from plugin.daemon.mig_wiring import sim_locations

NODE = "dgx-a100"
MIG_FILE = REPO / "configs" / "mig-parted.yaml"  # the mig-parted example, shipped
LAYOUTS = (
    ("all-1g.5gb", "nvidia.com/mig-1g.5gb", 56),
    ("all-2g.10gb", "nvidia.com/mig-2g.10gb", 24),
)


def reconfiguration_job(runs: int) -> list[Figure]:
    """Request -> the new resource's devices Healthy at the kubelet stand-in, per job."""
    text = MIG_FILE.read_text()
    samples = []
    with DaemonUnderTest(NODE, "version: v1\nflags: {migStrategy: mixed}\n") as node:
        kubelet = node.serve(["nvidia.com/gpu"])
        socket = sim_locations(Path(node.state_dir))[1]
        for run in range(runs):
            config, resource, count = LAYOUTS[run % 2]
            t0 = time.monotonic()
            answer = call(socket, {"op": "reconfigure", "config": config, "file_text": text,
                                   "file_name": str(MIG_FILE)})
            if not answer.get("ok"):
                raise RuntimeError(f"reconfigure {config} refused: {answer.get('error')}")
            seen = kubelet.wait_for_list(
                resource, lambda lst, n=count: len(lst.healthy_ids) == n, timeout_s=30
            )
            samples.append((seen.at - t0) * 1000)
            _wait_ended(socket, answer["job"]["id"])
    return [
        Figure.from_samples(
            "MIG job: request -> new resources at kubelet", f"{NODE} 8 GPUs 1g<->2g", "ms",
            samples, target_median=3000.0, target_p99=3000.0, target_text="<3000",
        )
    ]  # fmt: skip


def _wait_ended(socket: Path, job_id: int, timeout_s: float = 30.0) -> None:
    """Until the daemon has recorded the job's end (the next request would be refused)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = call(socket, {"op": "status"})
        if status["current"] is None and any(j["id"] == job_id for j in status["jobs"]):
            return
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not end within {timeout_s} s")
