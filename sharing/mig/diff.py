"""Layout diff: one GPU's current MIG state -> the ordered NVML steps that reach a desired layout.

Order: compute instances and GPU instances that do not belong are destroyed first (compute
instances before their GPU instance), then the MIG mode changes where it differs, then kept GPU
instances that lack their full compute instance get one, then missing GPU instances are created at
their explicit placements, each followed by its full compute instance. Instances that already
match (profile and start, one full compute instance) are kept untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sharing.mig.layout import GpuInstanceState, GpuMigState, Layout, Placement

SET_MIG_MODE = "set-mig-mode"
DESTROY_CI = "destroy-ci"
DESTROY_GI = "destroy-gi"
CREATE_GI = "create-gi"
CREATE_CI = "create-ci"
ACTIONS = (SET_MIG_MODE, DESTROY_CI, DESTROY_GI, CREATE_GI, CREATE_CI)


@dataclass(frozen=True)
class Step:
    """One NVML mutation on one GPU.

    `create-ci` names its GPU instance by placement (profile, start): the GI id is only known
    once the GI exists. Destroy steps name the ids the GPU reported when the diff was made.
    """

    gpu: int
    action: str
    profile: str = ""
    start: int = -1
    size: int = 0
    gi_id: int = -1
    ci_id: int = -1
    enabled: bool = False
    reset: bool = False  # set-mig-mode on Ampere: takes effect through a GPU reset

    def describe(self) -> str:
        """The step in words, e.g. `GPU 3: create GPU instance 3g.20gb at slots 4-7`."""
        where = (
            f"slot {self.start}"
            if self.size == 1
            else f"slots {self.start}-{self.start + self.size - 1}"
        )
        text = {
            SET_MIG_MODE: f"{'enable' if self.enabled else 'disable'} MIG mode"
            + (
                " (Ampere: takes effect through a GPU reset, which needs no processes running)"
                if self.reset
                else ""
            ),
            DESTROY_CI: f"destroy compute instance {self.ci_id} of GPU instance {self.gi_id} "
            f"({self.profile})",
            DESTROY_GI: f"destroy GPU instance {self.gi_id} ({self.profile} at {where})",
            CREATE_GI: f"create GPU instance {self.profile} at {where}",
            CREATE_CI: f"create the full compute instance of {self.profile} at {where}",
        }[self.action]
        return f"GPU {self.gpu}: {text}"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (the journal stores steps this way)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Step:
        """The step `to_json` wrote.

        Raises:
            ValueError: the data is not a step.
        """
        try:
            step = cls(**data)
        except TypeError as err:
            raise ValueError(f"not a MIG step: {err}") from None
        if step.action not in ACTIONS:
            raise ValueError(f"unknown MIG step action {step.action!r}")
        return step


def diff(state: GpuMigState, desired: Layout) -> tuple[Step, ...]:
    """The steps that take this GPU from its current state to `desired` (empty: nothing to do)."""
    steps: list[Step] = []
    mode_ok = state.mig_current == desired.mig_enabled == state.mig_pending
    if not desired.mig_enabled:
        if state.mig_current:
            for gi in _by_start(state.instances):
                steps += _destroy(state.index, gi)
        if not mode_ok and state.mig_capable:
            steps.append(_mode(state, False))
        return tuple(steps)
    wanted = set(desired.placements)
    present = state.instances if state.mig_current else ()
    kept = [gi for gi in present if gi.placement in wanted]
    for gi in _by_start(present):
        if gi.placement not in wanted:
            steps += _destroy(state.index, gi)
    if not mode_ok:
        steps.append(_mode(state, True))
    for gi in _by_start(kept):
        if not gi.full:
            steps += [_step(state.index, DESTROY_CI, gi, ci.ci_id) for ci in gi.compute_instances]
            steps.append(_create_ci(state.index, gi.placement))
    have = {gi.placement for gi in kept}
    for placement in sorted(wanted - have):
        steps.append(
            Step(state.index, CREATE_GI, placement.profile, placement.start, placement.size)
        )
        steps.append(_create_ci(state.index, placement))
    return tuple(steps)


def _by_start(instances: tuple[GpuInstanceState, ...] | list[GpuInstanceState]) -> list:
    return sorted(instances, key=lambda gi: gi.start)


def _step(gpu: int, action: str, gi: GpuInstanceState, ci_id: int = -1) -> Step:
    return Step(gpu, action, gi.profile, gi.start, gi.size, gi.gi_id, ci_id)


def _destroy(gpu: int, gi: GpuInstanceState) -> list[Step]:
    steps = [_step(gpu, DESTROY_CI, gi, ci.ci_id) for ci in gi.compute_instances]
    return [*steps, _step(gpu, DESTROY_GI, gi)]


def _create_ci(gpu: int, placement: Placement) -> Step:
    return Step(gpu, CREATE_CI, placement.profile, placement.start, placement.size)


def _mode(state: GpuMigState, enabled: bool) -> Step:
    return Step(state.index, SET_MIG_MODE, enabled=enabled, reset=state.mode_change_needs_reset)
