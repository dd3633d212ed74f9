"""Planning and applying mig-parted configs on a node through NVML, journalled.

This is the API the `gpushare mig` commands and the daemon's reconfiguration jobs call:

    plan = plan_mig(nvml, Path("/etc/gpushare/mig.yaml"), "all-balanced")
    plan.changed_gpus            # GPUs applying would touch; () when already applied
    result = apply_mig(nvml, plan, journal_path=state_dir / "mig-journal.json")
    result.ok, result.gpus       # per GPU: unchanged | applied | failed, with the reason
    resume_mig(nvml, journal_path=...)   # at daemon start: finish an interrupted apply

`apply_mig` checks every selected GPU before it touches any (layout feasible, GPU not lost, no
compute processes unless `force`, node unchanged since the plan), refusing with one error
otherwise. It then converges each GPU that differs, one at a time: it re-reads the GPU, diffs it
against the planned layout, runs the steps (MIG mode only where it differs; GPU instances at
explicit placements, each with its full compute instance), re-reads after a mode change, and
verifies the result. GPUs already right are never touched. Every step is journalled, so a killed
apply converges when run again, with no GPU or compute instance left over.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from sharing.errors import MigApplyRefused, MigConfigError, MigError, MigPlanError, NvmlError
from sharing.mig.diff import CREATE_CI, CREATE_GI, DESTROY_CI, DESTROY_GI, SET_MIG_MODE, Step, diff
from sharing.mig.layout import GpuMigState, Layout
from sharing.mig.parted import MAX_FILE_BYTES, MigPartedFile, parse_mig_parted
from sharing.mig.plan import GpuPlan, MigPlan, plan_config, plan_requests
from sharing.nvml.adapter import Nvml
from sharing.nvml.files import UnreadableFile, read_regular_text
from sharing.nvml.mig import refused
from sharing.nvml.mig_journal import FAILED, SUCCEEDED, Journal, journal_lock, read_journal
from sharing.nvml.mig_state import node_identity, read_gpu_mig_state, read_node_mig_state
from sharing.nvml.profiles import CI_PROFILE_INDEX_BY_SLICES

log = logging.getLogger("gpushare.mig.apply")

UNCHANGED, APPLIED, FAILED_GPU, UNTOUCHED = "unchanged", "applied", "failed", "untouched"
_MAX_ROUNDS = 3  # diff -> steps -> re-read; a mode change takes one extra round


@dataclass(frozen=True)
class StepEvent:
    """Passed to `on_step` around every journalled step: phase `started`, then `done`/`failed`."""

    step: Step
    phase: str  # "started" | "done" | "failed"
    number: int  # 1-based journal write number within this apply (started and done both count)
    error: str = ""


@dataclass(frozen=True)
class GpuOutcome:
    """What applying did to one GPU."""

    index: int
    label: str
    result: str  # unchanged | applied | failed | untouched (not selected by the config)
    steps: int  # NVML mutations performed on it
    layout: str  # its state afterwards, in words
    reason: str = ""  # why it failed

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "gpu": self.index,
            "label": self.label,
            "result": self.result,
            "steps": self.steps,
            "layout": self.layout,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ApplyResult:
    """The outcome of `apply_mig`: per GPU, and the interrupted apply it took over, if any."""

    config: str
    gpus: tuple[GpuOutcome, ...]
    resumed: str | None = None  # config name of an interrupted apply found in the journal

    @property
    def ok(self) -> bool:
        """No GPU failed."""
        return all(g.result != FAILED_GPU for g in self.gpus)

    @property
    def changed_gpus(self) -> tuple[int, ...]:
        """GPUs that were changed."""
        return tuple(g.index for g in self.gpus if g.result == APPLIED)

    @property
    def failed_gpus(self) -> tuple[int, ...]:
        """GPUs that could not be brought to the layout."""
        return tuple(g.index for g in self.gpus if g.result == FAILED_GPU)

    @property
    def mutations(self) -> int:
        """NVML mutations performed, all GPUs together."""
        return sum(g.steps for g in self.gpus)


OnStep = Callable[[StepEvent], None]


def load_mig_file(mig_file: str | os.PathLike[str] | MigPartedFile) -> MigPartedFile:
    """A parsed mig-parted file from a path (os.PathLike), text (str), or a parsed file.

    Raises:
        MigConfigError: the file cannot be read, is too large, or is invalid.
    """
    if isinstance(mig_file, MigPartedFile):
        return mig_file
    if isinstance(mig_file, str):
        return parse_mig_parted(mig_file)
    path = Path(mig_file)
    try:
        text = read_regular_text(path, MAX_FILE_BYTES, "mig-parted file")
    except UnreadableFile as err:
        raise MigConfigError(f"{path}: {err}") from None
    return parse_mig_parted(text, source=str(path))


def plan_mig(
    nvml: Nvml, mig_file: str | os.PathLike[str] | MigPartedFile, config_name: str | None
) -> MigPlan:
    """Plan config `config_name` of a mig-parted file on this node; touches nothing.

    `mig_file` is a path (any os.PathLike, e.g. pathlib.Path), the file's text (a str), or an
    already parsed MigPartedFile. `config_name` may be None when the file has one config.
    Per GPU the plan holds the current state, the desired layout (explicit placements) and the
    ordered steps; `plan.changed_gpus` lists the GPUs applying would touch.

    Raises:
        MigConfigError: the file is unreadable or invalid, or has no such config.
        MigPlanError: the config cannot be applied here (unknown profile, count over the
            maximum, does not fit, GPU index missing, GPU lost or not MIG capable); the one-line
            message names each GPU and the reason.
        NvmlError: NVML failed while reading the GPUs.
    """
    config = load_mig_file(mig_file).select(config_name)
    return plan_config(config, read_node_mig_state(nvml))


def apply_mig(
    nvml: Nvml,
    plan: MigPlan,
    *,
    journal_path: Path,
    force: bool = False,
    on_step: OnStep | None = None,
) -> ApplyResult:
    """Bring every GPU the plan selects to its planned layout, journalled; see the module doc.

    The GPUs are read again first: steps are recomputed from what the GPUs have now, so a plan
    made before a drain, or a journal left by a killed apply, still converges. `force` applies
    to GPUs with compute processes running (NVML may still refuse instances in use). `on_step`
    is called after each journal write (StepEvent); exceptions from it propagate.

    Raises:
        MigJournalError: the journal is corrupt, from another node, or cannot be written.
        MigPlanError: the plan no longer fits the GPUs, or was made on another node.
        MigApplyRefused: the pre-check failed (processes running), or another apply holds the
            journal's lock (`<journal>.lock`); nothing touched.
    Per-GPU failures after the pre-check do not raise: they are in the result (`ok` False).
    """
    node = node_identity(nvml)
    if node != plan.node:
        raise MigPlanError(
            f"config {plan.config!r}: the plan was made on another node "
            "(its GPU UUIDs differ); plan again"
        )
    with journal_lock(journal_path):
        return _apply(nvml, plan, node, Path(journal_path), force, on_step)


def _apply(
    nvml: Nvml,
    plan: MigPlan,
    node: tuple[str, ...],
    journal_path: Path,
    force: bool,
    on_step: OnStep | None,
) -> ApplyResult:
    previous = read_journal(journal_path, node)
    states = read_node_mig_state(nvml)
    fresh = plan_requests(plan.config, plan.source, states, plan.requests)
    _precheck(fresh, states, force)
    resumed = previous.config if previous is not None and previous.interrupted else None
    if resumed is not None:
        log.info(
            "MIG journal %s: an apply of config %r was interrupted (last step: %s); "
            "converging to config %r",
            journal_path,
            resumed,
            previous.last_step or "none",
            plan.config,
        )
    journal = Journal(
        journal_path, node=node, config=plan.config, source=plan.source, requests=plan.requests
    )
    journal.begin()
    runner = _Runner(nvml, journal, plan.config, on_step)
    outcomes = [runner.converge(gpu) for gpu in fresh.gpus]
    ok = all(o.result != FAILED_GPU for o in outcomes)
    journal.finish(SUCCEEDED if ok else FAILED, [o.to_json() for o in outcomes])
    return ApplyResult(plan.config, tuple(outcomes), resumed)


def resume_mig(
    nvml: Nvml, *, journal_path: Path, force: bool = False, on_step: OnStep | None = None
) -> ApplyResult | None:
    """Finish an apply the journal records as interrupted; None when there is none to finish.

    Raises:
        MigJournalError, MigPlanError, MigApplyRefused: as apply_mig.
    """
    record = read_journal(journal_path, node_identity(nvml))
    if record is None or not record.interrupted:
        return None
    plan = plan_requests(record.config, record.source, read_node_mig_state(nvml), record.requests)
    return apply_mig(nvml, plan, journal_path=journal_path, force=force, on_step=on_step)


def _precheck(plan: MigPlan, states: tuple[GpuMigState, ...], force: bool) -> None:
    problems = []
    for gpu, state in zip(plan.gpus, states, strict=True):
        if not gpu.changed or not state.processes:
            continue
        pids = ", ".join(map(str, state.processes[:8])) + ("…" if len(state.processes) > 8 else "")
        running = f"{len(state.processes)} compute process(es) running (pids {pids})"
        if any(s.action == SET_MIG_MODE for s in gpu.steps):
            problems.append(f"{gpu.label}: {running}; a MIG mode change needs none, even forced")
        elif not force:
            problems.append(f"{gpu.label}: {running}; stop them, or force the apply")
    if problems:
        raise MigApplyRefused(f"config {plan.config!r}: nothing changed: " + "; ".join(problems))


class _Runner:
    """Converges GPUs one at a time, journalling every step."""

    def __init__(self, nvml: Nvml, journal: Journal, config: str, on_step: OnStep | None) -> None:
        self.nvml = nvml
        self.journal = journal
        self.config = config
        self.on_step = on_step
        self.writes = 0
        self.gi_handles: dict[tuple[int, int], Any] = {}

    def converge(self, gpu: GpuPlan) -> GpuOutcome:
        if gpu.request is None or gpu.desired is None:
            return GpuOutcome(gpu.index, gpu.label, UNTOUCHED, 0, gpu.current)
        if not gpu.changed:
            return GpuOutcome(gpu.index, gpu.label, UNCHANGED, 0, gpu.current)
        done = 0
        try:
            for _ in range(_MAX_ROUNDS):
                state = _alive(read_gpu_mig_state(self.nvml, gpu.index))
                steps = diff(state, gpu.desired)
                if not steps:
                    break
                for step in steps:
                    self._run(state, step)
                    done += 1
                    if step.action == SET_MIG_MODE:
                        break  # the mode change may wipe instances: read the GPU again
            state = _alive(read_gpu_mig_state(self.nvml, gpu.index))
            _verify(state, gpu.desired)
        except (MigError, NvmlError) as err:
            log.error("%s: MIG layout of config %r not applied: %s", gpu.label, self.config, err,
                      extra={"gpu": gpu.index})
            try:
                after = read_gpu_mig_state(self.nvml, gpu.index).describe()
            except NvmlError as read_err:
                after = f"unknown ({read_err})"
            return GpuOutcome(gpu.index, gpu.label, FAILED_GPU, done, after, str(err))
        log.info("%s: MIG layout applied in %d steps: %s", gpu.label, done, state.describe(),
                 extra={"gpu": gpu.index})
        return GpuOutcome(gpu.index, gpu.label, APPLIED, done, state.describe())

    def _event(self, step: Step, phase: str, error: str = "") -> None:
        self.writes += 1
        if self.on_step is not None:
            self.on_step(StepEvent(step, phase, self.writes, error))

    def _run(self, state: GpuMigState, step: Step) -> None:
        self.journal.started(step)
        self._event(step, "started")
        try:
            self._execute(state, step)
        except (MigError, NvmlError) as err:
            self.journal.failed(step, str(err))
            self._event(step, "failed", str(err))
            raise
        log.info("%s", step.describe(), extra={"gpu": step.gpu})
        self.journal.done(step)
        self._event(step, "done")

    def _execute(self, state: GpuMigState, step: Step) -> None:
        nvml, what = self.nvml, step.describe()
        handle = nvml.handle(step.gpu)
        try:
            if step.action == SET_MIG_MODE:
                _set_mode(nvml, handle, step)
            elif step.action == DESTROY_CI:
                gi = nvml.call("nvmlDeviceGetGpuInstanceById", handle, step.gi_id)
                ci = nvml.call("nvmlGpuInstanceGetComputeInstanceById", gi, step.ci_id)
                nvml.call("nvmlComputeInstanceDestroy", ci)
            elif step.action == DESTROY_GI:
                gi = nvml.call("nvmlDeviceGetGpuInstanceById", handle, step.gi_id)
                nvml.call("nvmlGpuInstanceDestroy", gi)
            elif step.action == CREATE_GI:
                profile = next(p for p in state.profiles if p.name == step.profile)
                placement = pynvml.c_nvmlGpuInstancePlacement_t(step.start, step.size)
                self.gi_handles[(step.gpu, step.start)] = nvml.call(
                    "nvmlDeviceCreateGpuInstanceWithPlacement", handle, profile.id,
                    ctypes.byref(placement))  # fmt: skip
            elif step.action == CREATE_CI:
                self._create_ci(state, handle, step)
        except NvmlError as err:
            raise refused(err, what) from err

    def _create_ci(self, state: GpuMigState, handle: Any, step: Step) -> None:
        gi = self.gi_handles.pop((step.gpu, step.start), None)
        if gi is None:
            gi_id = next(g.gi_id for g in state.instances if g.start == step.start)
            gi = self.nvml.call("nvmlDeviceGetGpuInstanceById", handle, gi_id)
        slices = next(p.slices for p in state.profiles if p.name == step.profile)
        info = self.nvml.call(
            "nvmlGpuInstanceGetComputeInstanceProfileInfo", gi,
            CI_PROFILE_INDEX_BY_SLICES[slices], pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
        )  # fmt: skip
        self.nvml.call("nvmlGpuInstanceCreateComputeInstance", gi, int(info.id))


def _set_mode(nvml: Nvml, handle: Any, step: Step) -> None:
    mode = pynvml.NVML_DEVICE_MIG_ENABLE if step.enabled else pynvml.NVML_DEVICE_MIG_DISABLE
    nvml.call("nvmlDeviceSetMigMode", handle, mode)
    current, pending = nvml.call("nvmlDeviceGetMigMode", handle)
    if bool(current) != step.enabled:
        state = "pending a GPU reset" if bool(pending) == step.enabled else "not applied"
        raise MigError(
            f"GPU {step.gpu}: MIG mode change {state} (compute processes are "
            "running on the GPU); stop them, reset the GPU, and apply again"
        )


def _alive(state: GpuMigState) -> GpuMigState:
    if state.lost_reason:
        raise MigError(f"{state.label}: the GPU is lost ({state.lost_reason})")
    return state


def _verify(state: GpuMigState, desired: Layout) -> None:
    """Read-back check: the GPU has exactly the desired layout, every instance full."""
    if (
        state.layout() == desired
        and all(gi.full for gi in state.instances)
        and state.mig_pending == state.mig_current
    ):
        return
    raise MigError(f"{state.label}: read back {state.describe()}, expected {desired.describe()}")
