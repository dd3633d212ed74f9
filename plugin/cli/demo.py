"""`gpushare demo`: the daemon on a simulated node, driven by the kubelet stand-in, narrated.

Each step is a function taking the DemoContext, so later parts (health recovery, MPS, MIG
reconfiguration) can add or extend steps. Everything runs in one temporary directory.

When the reader stops reading (`gpushare demo | head`), the walkthrough ends quietly: the daemon
and the kubelet stand-in are stopped, the directory removed, and the exit status is 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

from plugin.daemon.core import Daemon
from plugin.standin.kubelet import KubeletStandIn
from sharing.errors import SharingError

DEMO_CONFIG = """\
# gpushare demo: every GPU shared by time-slicing, 4 replicas each, under nvidia.com/gpu.
version: v1
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replicas: 4
"""
WAIT_S = 10.0
FAULT_XID = 79  # GPU has fallen off the bus


@dataclass
class DemoContext:
    """What every demo step can use."""

    workdir: Path
    node: str
    config_path: Path
    daemon: Daemon
    kubelet: KubeletStandIn
    sim_state: Path
    out: TextIO
    notes: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        """Print one line of the walkthrough.

        Raises:
            ReaderGone: nobody reads the output any more.
        """
        _say(self.out, text)


class ReaderGone(Exception):
    """Whoever read the walkthrough stopped reading (a closed pipe, as with `| head`)."""


def _say(out: TextIO, text: str = "") -> None:
    """Print one line; a closed reader ends the walkthrough.

    Raises:
        ReaderGone: the output is a closed pipe.
    """
    try:
        print(text, file=out, flush=True)
    except (BrokenPipeError, ValueError) as err:  # ValueError: the stream was closed
        raise ReaderGone() from err


Step = Callable[[DemoContext], None]


class _Narrator(logging.Handler):
    """Shows the daemon's log lines, indented, inside the walkthrough (below WARNING, not those
    of the `quiet` loggers)."""

    def __init__(self, out: TextIO, quiet: tuple[str, ...] = ()) -> None:
        super().__init__(logging.INFO)
        self.out = out
        self.quiet = quiet
        self.gone = False

    def emit(self, record: logging.LogRecord) -> None:
        # Runs on the daemon's threads too: a closed reader must never raise there.
        if self.gone:
            return
        if record.levelno < logging.WARNING and record.name.startswith(self.quiet or ("\0",)):
            return
        try:
            print(f"    [daemon] {record.getMessage()}", file=self.out, flush=True)
        except (OSError, ValueError):
            self.gone = True


@contextmanager
def narrated_logs(out: TextIO, quiet: tuple[str, ...] = ()) -> Iterator[None]:
    """Route log records into the walkthrough while the demo runs."""
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    root.handlers = [_Narrator(out, quiet)]
    root.setLevel(min(saved_level, logging.INFO) or logging.INFO)
    try:
        yield
    finally:
        root.handlers = saved
        root.setLevel(saved_level)


def show_registration(ctx: DemoContext) -> None:
    """Step 1: the resources the kubelet registered and the device lists it received."""
    names = ctx.daemon.plan.names
    ctx.kubelet.wait_for(lambda: set(names) <= set(ctx.kubelet.resources()), WAIT_S)
    if not ctx.daemon.link.wait_registered(WAIT_S):
        raise TimeoutError(f"not every resource registered within {WAIT_S}s")
    ctx.say()
    ctx.say("The kubelet stand-in received these registrations and device lists:")
    ctx.say(f"    {'resource':<28} {'socket':<30} {'devices':>7} {'healthy':>7}")
    for name in names:
        latest = ctx.kubelet.wait_for_list(name, lambda _: True, WAIT_S)
        socket = ctx.kubelet.registrations_of(name)[-1].endpoint
        ctx.say(f"    {name:<28} {socket:<30} {len(latest.devices):>7} "
                f"{len(latest.healthy_ids):>7}")
    first = ctx.daemon.plan.resources[0]
    sample = ", ".join(d.id for d in first.devices[:2])
    ctx.say(f"    device IDs look like: {sample}, ...")


def show_allocation(ctx: DemoContext) -> None:
    """Step 2: a container asks for two devices: GetPreferredAllocation, then Allocate."""
    resource = ctx.daemon.plan.resources[0]
    name = resource.name
    count = 1 if resource.shared and resource.fail_requests_greater_than_one else 2
    ctx.say()
    ctx.say(f"A pod asks for {count} x {name}. The kubelet calls GetPreferredAllocation, "
            "then Allocate:")
    got = ctx.kubelet.allocate(name, count)
    ctx.say(f"    preferred and allocated: {', '.join(got.chosen[0])}")
    response = got.response.container_responses[0]
    ctx.say("    ContainerAllocateResponse:")
    for key, value in sorted(response.envs.items()):
        ctx.say(f"      env {key}={value}")
    for key, value in sorted(response.annotations.items()):
        ctx.say(f"      annotation {key}={value}")
    for mount in response.mounts:
        ctx.say(f"      mount {mount.host_path} -> {mount.container_path}")
    for spec in response.devices:
        ctx.say(f"      device {spec.host_path} ({spec.permissions})")
    for cdi in response.cdi_devices:
        ctx.say(f"      CDI device {cdi.name}")


def show_fault(ctx: DemoContext) -> None:
    """Step 3: an XID on one GPU, and every replica of that GPU turning Unhealthy."""
    from sharing.nvml.sim import lose_gpu

    name = ctx.daemon.plan.resources[0].name
    device = ctx.daemon.plan.resources[0].devices[-1]
    gpu_uuid, gpu_index = device.gpu_uuid, device.gpu_index
    siblings = [d.id for d in ctx.daemon.plan.resources[0].devices if d.gpu_uuid == gpu_uuid]
    ctx.say()
    ctx.say(f"Fault: XID {FAULT_XID} (GPU fell off the bus) injected on GPU {gpu_index} "
            f"({gpu_uuid}) in the simulator.")
    lose_gpu(ctx.sim_state, gpu_index, FAULT_XID)
    latest = ctx.kubelet.wait_for_list(
        name, lambda d: set(siblings) <= set(d.unhealthy_ids), WAIT_S
    )
    ctx.say(f"    the kubelet's next list: {len(latest.healthy_ids)} of {len(latest.devices)} "
            f"Healthy; Unhealthy: {', '.join(latest.unhealthy_ids)}")
    ctx.say(f"    every replica of GPU {gpu_index} left the allocatable pool; pods already "
            "holding one keep it until they end.")


def show_recovery(ctx: DemoContext) -> None:
    """Step 4: the faulted GPU is reset and its replicas come back without a restart."""
    from sharing.nvml.sim import reset_gpu

    name = ctx.daemon.plan.resources[0].name
    gpu_index = ctx.daemon.plan.resources[0].devices[-1].gpu_index
    ctx.say()
    ctx.say(f"Recovery: GPU {gpu_index} is reset (as `gpushare sim reset`); XID {FAULT_XID} "
            "needs a reset, so only a GPU seen again after one is trusted.")
    reset_gpu(ctx.sim_state, gpu_index)
    latest = ctx.kubelet.wait_for_list(name, lambda d: not d.unhealthy_ids, WAIT_S)
    ctx.say(f"    the kubelet's next list: {len(latest.healthy_ids)} of {len(latest.devices)} "
            "Healthy, with no daemon restart.")


def show_shutdown(ctx: DemoContext) -> None:
    """Step 5: a clean stop removes the daemon's sockets."""
    sockets = sorted(ctx.daemon.socket_names().values())
    ctx.daemon.stop()
    left = [s for s in sockets if (ctx.kubelet.kubelet_dir / s).exists()]
    ctx.say()
    ctx.say(f"Stop (as on SIGTERM): {', '.join(sockets)} removed; left behind: {left or 'none'}.")


STEPS: list[Step] = [
    show_registration, show_allocation, show_fault, show_recovery, show_shutdown,
]


def run_demo(
    *, node: str = "dgx-a100", config: Path | None = None, keep: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Run every step; 0 on success (or when the reader stopped reading), 1 when a step fails
    (the error is printed)."""
    workdir = Path(tempfile.mkdtemp(prefix="gpushare-demo-", dir="/tmp"))
    workdir.chmod(0o755)  # holds the mpsRoot, which MPS servers of any user must search
    try:
        with narrated_logs(out):
            return _run(workdir, node, config, out)
    except ReaderGone:
        _discard_output(out)
        return 0
    finally:
        if keep:
            with contextlib.suppress(ReaderGone):
                _say(out, f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _discard_output(out: TextIO) -> None:
    """Point a closed standard output at /dev/null, so the exit flush does not complain."""
    if out is not sys.stdout:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _run(workdir: Path, node: str, config: Path | None, out: TextIO) -> int:
    from sharing import nvml
    from sharing.nvml.sim import create_state, is_state_dir

    kubelet_dir = workdir / "kubelet"
    kubelet_dir.mkdir()
    config_path = workdir / "config.yaml"
    config_path.write_text(config.read_text() if config else DEMO_CONFIG)
    _say(out, f"gpushare demo: simulated node {node}, kubelet stand-in in {kubelet_dir}")
    _say(out, "config:")
    for line in config_path.read_text().splitlines():
        _say(out, f"    {line}")
    _say(out)
    try:
        sim_state = Path(node)
        if not is_state_dir(sim_state):
            sim_state = create_state(node, workdir / "node")
        kubelet = KubeletStandIn(kubelet_dir)
        # MPS pipes, logs and shm, and the CDI spec, stay in the demo's own directory.
        daemon = Daemon(config_path=config_path, kubelet_dir=kubelet_dir,
                        nvml_lib=nvml.load_library(str(sim_state)), env={},
                        overrides={"mps-root": str(workdir / "mps")},
                        cdi_spec_dir=workdir / "cdi")
        ctx = DemoContext(workdir, node, config_path, daemon, kubelet, sim_state, out)
        try:
            daemon.start()
            for step in STEPS:
                step(ctx)
        finally:
            daemon.stop()
            kubelet.stop()
    except (SharingError, OSError, TimeoutError, grpc.RpcError) as err:
        _say(out, f"gpushare demo failed: {err}")
        return 1
    _say(out)
    _say(out, "demo complete.")
    return 0
