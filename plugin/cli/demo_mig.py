"""`gpushare demo --mig`: MIG reconfiguration jobs on a simulated DGX A100, narrated.

The daemon serves the node with migStrategy mixed and MIG reconfiguration jobs (control socket
and state directory in the demo's temporary directory); the kubelet stand-in shows what a
kubelet would see. Steps: a requested job swaps the advertised resources without a restart; a
job blocked by a running process fails after its drain timeout and changes nothing; a cron
entry added by a config reload fires a job; the job history as `gpushare mig status` prints it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import grpc

from plugin.cli.demo import WAIT_S, narrated_logs
from plugin.cli.mig_client import format_status
from plugin.daemon.control import ControlError, call
from plugin.daemon.core import Daemon
from plugin.daemon.mig_wiring import add_mig_jobs
from plugin.standin.kubelet import KubeletStandIn
from sharing.errors import SharingError

# One line per NVML step, per scheduler event and per labels file write is too much here.
QUIET_LOGGERS = ("gpushare.mig.apply", "apscheduler", "gpushare.labels")
MIG_FILE = """\
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-1g.5gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  all-3g.20gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  all-balanced:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
"""
CONFIG = """\
# gpushare demo --mig: MIG devices advertised per profile; reconfiguration jobs from mig.yaml.
version: v1
flags:
  migStrategy: mixed
migReconfiguration:
  configFile: mig.yaml
  drainTimeout: 2s
"""


class MigDemo:
    """The daemon, the kubelet stand-in and the simulator of one walkthrough."""

    def __init__(self, workdir: Path, node: str, out: TextIO) -> None:
        from sharing import nvml
        from sharing.nvml.sim import create_state

        self.workdir = workdir
        self.out = out
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(CONFIG)
        (workdir / "mig.yaml").write_text(MIG_FILE)
        self.sim_state = create_state(node, workdir / "node")
        kubelet_dir = workdir / "kubelet"
        kubelet_dir.mkdir()
        self.socket = workdir / "control.sock"
        self.kubelet = KubeletStandIn(kubelet_dir)
        lib = nvml.load_library(str(self.sim_state))
        self.labels_file = workdir / "features.d" / "gfd"
        self.daemon = Daemon(config_path=self.config_path, kubelet_dir=kubelet_dir,
                             nvml_lib=lib, env={},
                             overrides={"labels-file": str(self.labels_file)}, node_labels=True)
        add_mig_jobs(self.daemon, state_dir=workdir / "state", control_socket=self.socket,
                     nvml_lib=lib)

    def say(self, text: str = "") -> None:
        """Print one line of the walkthrough."""
        print(text, file=self.out, flush=True)

    def show_resources(self, heading: str) -> None:
        """The resources the kubelet has open streams for, with device counts."""
        self.say(heading)
        for name in self.kubelet.streaming():
            latest = self.kubelet.latest(name)
            healthy = len(latest.healthy_ids) if latest else 0
            total = len(latest.devices) if latest else 0
            self.say(f"    {name:<26} {total:>3} devices, {healthy:>3} Healthy")
        lines = self.labels_file.read_text().splitlines() if self.labels_file.exists() else []
        for line in lines:
            if line.startswith("nvidia.com/mig.config"):
                self.say(f"    label {line}   (in the node labels file)")

    def reconfigure(self, config: str) -> dict[str, Any]:
        """What `gpushare mig reconfigure -c CONFIG --wait` does (the daemon's log narrates)."""
        self.say(f"$ gpushare mig reconfigure -c {config} --wait")
        answer = call(self.socket, {"op": "reconfigure", "config": config, "wait": True},
                      timeout_s=60)
        if not answer["ok"]:
            raise ControlError(answer["error"])
        job = answer["job"]
        self.say(f"    job {job['id']} {job['result']}: {job['reason']}")
        return job

    def wait_streaming(self, names: set[str]) -> None:
        """Until exactly these resources stream, each has sent a list, every device Healthy."""
        def ready() -> bool:
            lists = {n: self.kubelet.latest(n) for n in self.kubelet.streaming()}
            return set(lists) == names and all(
                x is not None and x.devices and not x.unhealthy_ids for x in lists.values())
        self.kubelet.wait_for(ready, 3 * WAIT_S)


def step_requested_job(demo: MigDemo) -> None:
    """A requested job: the GPUs drain, MIG is applied, the new resources are served."""
    demo.wait_streaming({"nvidia.com/gpu"})
    demo.show_resources("The kubelet sees the 8 GPUs whole (MIG off):")
    demo.say()
    demo.reconfigure("all-1g.5gb")
    demo.wait_streaming({"nvidia.com/mig-1g.5gb"})
    gpu_lists = demo.kubelet.lists("nvidia.com/gpu")
    went = next((x for x in gpu_lists if len(x.unhealthy_ids) == len(x.devices)), None)
    if went is not None:
        demo.say(f"    the kubelet saw all {len(went.devices)} nvidia.com/gpu devices turn "
                 "Unhealthy before anything was touched")
    demo.show_resources("Now, with the same daemon process (no restart):")


def step_blocked_job(demo: MigDemo) -> None:
    """A process on GPU 0 outlasts the drain timeout: the job fails and changes nothing."""
    from sharing.nvml.sim import start_process, stop_process

    mig = demo.daemon.inventory.gpu(0).mig_devices[0] if demo.daemon.inventory else None
    gi, ci = (mig.gi_id, mig.ci_id) if mig else (None, None)
    pid = start_process(demo.sim_state, 0, gi, ci)
    demo.say()
    demo.say(f"A workload (pid {pid}) runs on GPU 0, MIG device {gi}:{ci}; drainTimeout is 2s.")
    demo.reconfigure("all-3g.20gb")
    demo.wait_streaming({"nvidia.com/mig-1g.5gb"})
    demo.show_resources("The layout and the devices are as they were:")
    stop_process(demo.sim_state, 0, gi, ci, pid=pid)
    demo.say(f"The workload (pid {pid}) ends.")


def step_scheduled_job(demo: MigDemo) -> None:
    """A schedule entry added to the config fires a job a few seconds later."""
    at = datetime.now() + timedelta(seconds=3)
    cron = f"{at.second} {at.minute} {at.hour} * * *"
    demo.say()
    demo.say(f'The config gains a schedule entry (reloaded without a restart): cron "{cron}" '
             "-> all-balanced")
    demo.config_path.write_text(CONFIG + f'  schedule:\n    - {{cron: "{cron}", '
                                "config: all-balanced}\n")
    demo.wait_streaming({"nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb",
                         "nvidia.com/mig-3g.20gb"})
    demo.show_resources(f"At {at:%H:%M:%S} the entry fired; the kubelet now sees:")


def step_status(demo: MigDemo) -> None:
    """The job history, as `gpushare mig status` prints it."""
    answer = call(demo.socket, {"op": "status"})
    answer.pop("ok")
    demo.say()
    demo.say("$ gpushare mig status")
    for line in format_status(answer).splitlines():
        demo.say(f"    {line}")


STEPS = [step_requested_job, step_blocked_job, step_scheduled_job, step_status]


def run_mig_demo(*, node: str = "dgx-a100", keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the MIG walkthrough; 0 on success, 1 when a step fails (the error is printed)."""
    workdir = Path(tempfile.mkdtemp(prefix="gpushare-demo-mig-", dir="/tmp"))
    try:
        with narrated_logs(out, quiet=QUIET_LOGGERS):
            return _run(workdir, node, out)
    finally:
        if keep:
            print(f"kept {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, node: str, out: TextIO) -> int:
    print(f"gpushare demo --mig: simulated node {node}, everything in {workdir}", file=out)
    print("config.yaml:", file=out)
    for line in CONFIG.splitlines():
        print(f"    {line}", file=out)
    print(file=out)
    try:
        demo = MigDemo(workdir, node, out)
        try:
            demo.daemon.start()
            for step in STEPS:
                step(demo)
        finally:
            demo.daemon.stop()
            demo.kubelet.stop()
    except (SharingError, OSError, TimeoutError, ControlError, grpc.RpcError) as err:
        print(f"gpushare demo --mig failed: {err}", file=out)
        return 1
    print(file=out)
    print("demo complete.", file=out)
    return 0


__all__ = ["run_mig_demo"]
