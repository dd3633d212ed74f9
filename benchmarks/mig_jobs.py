"""MIG reconfiguration jobs measured against a `gpushare run` process on a simulated DGX A100.

`mig-job`: request on the control socket -> new MIG resources at the kubelet. The daemon runs
with migStrategy mixed; the request is the one `gpushare mig reconfigure` sends (without
waiting); the clock stops when the kubelet stand-in has the first list of the new resource with
every device Healthy. No process runs, so nothing is drained. Runs alternate between two
layouts, so each run changes all 8 GPUs.

`mig-file-load`: Allocate (1 device, time-slicing x8) while another process sends `mig
reconfigure` requests carrying a 287 KB mig-parted file back to back (config `all-disabled`:
parsed, planned, nothing to change, so each request is the parse and nothing else), next to the
same calls with no request. Parsing the file must not hold up Allocate.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import time
from functools import partial
from pathlib import Path

from benchmarks.measure import _timed
from benchmarks.node import REPO, DaemonUnderTest
from benchmarks.stats import Figure
from plugin.daemon import convert
from plugin.daemon.control import call
from plugin.daemon.mig_wiring import sim_locations

LARGE_FILE_BYTES = 287_000
ALLOCATE_WARMUP = 200

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


def large_mig_file(target_bytes: int = LARGE_FILE_BYTES) -> str:
    """A valid mig-parted file of about `target_bytes`, within the parser's bounds:
    `all-disabled` first, then configs of four entries with eight device filters each."""
    lines = ["version: v1", "mig-configs:", "  all-disabled:", "    - devices: all",
             "      mig-enabled: false"]
    filters = ", ".join(f"0x20B{i:01X}10DE:0x134F10DE" for i in range(8))
    size, n = sum(len(x) + 1 for x in lines), 0
    while size < target_bytes:
        block = [f"  bulk-{n:04d}-{'x' * 100}:"]
        for e in range(4):
            block += [f"    - devices: [{e}, {e + 4}]", f"      device-filter: [{filters}]",
                      "      mig-enabled: true", "      mig-devices: {1g.5gb: 7}"]
        lines += block
        size += sum(len(x) + 1 for x in block)
        n += 1
    return "\n".join(lines) + "\n"


def _submit_until_stopped(socket: str, text: str, stop: object, count: object) -> None:
    """Another process's loop: reconfigure all-disabled with `text`, back to back."""
    request = {"op": "reconfigure", "config": "all-disabled", "file_text": text,
               "file_name": "large-mig-parted.yaml"}
    while not stop.is_set():  # type: ignore[attr-defined]
        answer = call(socket, request)
        if not answer.get("ok") or answer["job"]["result"] != "success":
            raise RuntimeError(f"reconfigure all-disabled: {answer}")
        with count.get_lock():  # type: ignore[attr-defined]
            count.value += 1  # type: ignore[attr-defined]


def allocate_under_mig_files(calls: int) -> list[Figure]:
    """Allocate 1 device with no MIG request, then while 287 KB mig-parted files arrive (at
    least `calls` calls, and on until calls // 100 requests were answered, 300 s at most)."""
    requests = max(2, calls // 100)
    text = large_mig_file()
    config = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
              "    - name: nvidia.com/gpu\n      replicas: 8\n")
    context = multiprocessing.get_context("spawn")  # its own interpreter, its own GIL
    with DaemonUnderTest(NODE, config) as node:
        ids = node.serve(["nvidia.com/gpu"]).latest("nvidia.com/gpu").healthy_ids  # type: ignore[union-attr]
        allocate = partial(node.stub("gpu").Allocate,
                           convert.to_pb_allocate_request([[ids[0]]]), timeout=5)
        socket = str(sim_locations(Path(node.state_dir))[1])
        _timed(allocate, ALLOCATE_WARMUP)
        idle = _timed(allocate, calls)
        stop, count = context.Event(), context.Value("i", 0)
        submitter = context.Process(target=_submit_until_stopped,
                                    args=(socket, text, stop, count), daemon=True)
        submitter.start()
        try:
            deadline = time.monotonic() + 30
            while count.value < 2:  # the reader's child (if any) has started: steady state
                if not submitter.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the mig-parted requests did not get through")
                time.sleep(0.05)
            before, t0 = count.value, time.monotonic()
            loaded: list[float] = []
            while len(loaded) < calls or count.value - before < requests:
                loaded += _timed(allocate, 100)
                if time.monotonic() - t0 > 300:
                    break
            took, sent = time.monotonic() - t0, count.value - before
        finally:
            stop.set()
            submitter.join(30)
    where = f"{NODE} ts x8"
    per_request = f"{took / sent * 1000:.0f} ms per request" if sent else "no request"
    return [
        _with_max(Figure.from_samples(
            "Allocate 1 device, no MIG request", where, "ms", idle), idle, ""),
        _with_max(Figure.from_samples(
            f"Allocate 1 device, {LARGE_FILE_BYTES // 1000} KB mig-parted files back to back",
            where, "ms", loaded), loaded,
            f"{sent} requests during the {len(loaded)} calls ({per_request}); median "
            f"{statistics.median(loaded) / statistics.median(idle):.1f}x the idle one"),
    ]  # fmt: skip


def _with_max(figure: Figure, samples: list[float], detail: str) -> Figure:
    """The figure with its largest sample in `extra` and the detail line."""
    top = max(samples)
    text = f"max {top:.1f} ms" + (f"; {detail}" if detail else "")
    return dataclasses.replace(figure, extra={"max": top}, detail=text)
