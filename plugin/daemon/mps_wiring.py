"""Wiring of the MPS supervisor into the daemon: which control program, and who hears of it.

The control program is `--mps-control PATH` when given; on a simulated node (`--node`, `gpushare
demo`) the stand-in `mps_daemon/standin.py`, run with this interpreter; otherwise
`nvidia-cuda-mps-control` as found on PATH. A missing program marks the MPS resources Unhealthy
with a clear reason; the daemon stays up.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from mps_daemon import MANAGE_COMPUTE_MODE, MpsSupervisor, standin_argv
from sharing.plan_types import Plan

CONTROL_PROGRAM = "nvidia-cuda-mps-control"


class MpsHealth(Protocol):
    """Where MPS daemon transitions go (plugin.health_monitor.HealthMonitor)."""

    def mps_down(self, resource: str, reason: str) -> None:
        """Every device of `resource` Unhealthy."""

    def mps_up(self, resource: str) -> None:
        """The daemon of `resource` answers again."""


class MpsHost(Protocol):
    """What the wiring needs from plugin.daemon.Daemon."""

    nvml: Any
    mps_held: frozenset[str]  # GPU UUIDs no MPS daemon may run on (a MIG job's drain)

    @property
    def plan(self) -> Plan:
        """The Plan now served."""

    def add_component(self, component: Any) -> None:
        """Run a background component with the daemon."""

    def add_plan_listener(self, listener: Any) -> None:
        """Call `listener(plan, inventory)` after every applied Plan."""


def mps_control_for(
    nvml_lib: object, requested: str | Sequence[str] | None, env: Mapping[str, str]
) -> str | Sequence[str]:
    """The control program's argv prefix: requested, the stand-in on a simulated node, or PATH's."""
    if requested:
        return requested
    from sharing.nvml.sim import SimNvml

    if isinstance(nvml_lib, SimNvml):
        return standin_argv()
    return shutil.which(CONTROL_PROGRAM, path=env.get("PATH")) or CONTROL_PROGRAM


def add_mps_supervisor(
    daemon: MpsHost,
    health: MpsHealth,
    *,
    control: str | Sequence[str],
    env: Mapping[str, str],
    compute_mode: str = MANAGE_COMPUTE_MODE,
    restarted: Callable[[str], None] | None = None,
) -> MpsSupervisor:
    """Create the supervisor for the daemon's current Plan and have it follow every new one,
    leaving out the MPS resources on the GPUs in `daemon.mps_held` (a MIG job drains them)."""
    supervisor = MpsSupervisor(
        control_binary=control, down=health.mps_down, up=health.mps_up, nvml=daemon.nvml, env=env,
        compute_mode=compute_mode,
        restarted=restarted,
    )

    def follow(plan: Plan, _inventory: object = None) -> None:
        supervisor.update(without_held(plan, daemon.mps_held))

    follow(daemon.plan)
    daemon.add_plan_listener(follow)
    daemon.add_component(supervisor)
    return supervisor


def without_held(plan: Plan, held: frozenset[str]) -> Plan:
    """`plan` as the MPS supervisor should run it: no MPS daemon on the held GPUs (UUIDs),
    whatever its resource is called (a reload may rename it)."""
    if not held:
        return plan
    kept = tuple(r for r in plan.resources if not (r.mps and held & set(r.mps.gpu_uuids)))
    return replace(plan, resources=kept)
