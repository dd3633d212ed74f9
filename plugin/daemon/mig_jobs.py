"""MIG reconfiguration jobs inside `gpushare run`: one at a time, drained, journalled, served.

A job: plan (refused at once, nothing touched, when the config is unknown or does not fit) ->
the virtual devices of the GPUs it changes go Unhealthy at the kubelet and gpushare's MPS
daemons on them stop -> wait until no compute process runs there (past `drainTimeout`: killed
when `killProcesses`, else the job fails, nothing touched, devices Healthy again) -> apply
(journalled under --state-dir) -> verify (a new plan has nothing left to do) -> reload: the
inventory is read again and the new Plan's diff is served (new MIG resources registered,
vanished ones stopped) without a restart. A request while a job runs is refused, naming it.

The node labels `nvidia.com/mig.config` and `nvidia.com/mig.config.state` (pending, success,
failed) follow the last job: state listeners (the daemon's labels file) hear each change.
Listeners added with `add_result_listener` hear every ended job (metrics count them by
result). A daemon started after a crash mid-job rolls the journalled apply forward before it
serves (`resume`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, Protocol

from plugin.daemon.mig_drain import (
    DRAIN_POLL_S,
    MPS_SOURCE,
    OVERLAY_SOURCE,
    STALE_SOURCE,
    Drain,
    DrainCancelled,
    ProcessKiller,
)
from plugin.daemon.mig_engine import MigEngine, read_mig_file
from plugin.daemon.mig_history import ActiveJob, GpuOutcome, JobRecord, JobStore
from plugin.daemon.mig_resume import resume
from sharing.errors import SharingError
from sharing.mig import GpuPlan, MigPlan
from sharing.nvml import Nvml
from sharing.nvml.mig_apply import ApplyResult, StepEvent
from sharing.plan_types import Plan

log = logging.getLogger("gpushare.mig.jobs")

CONFIG_LABEL = "nvidia.com/mig.config"
STATE_LABEL = "nvidia.com/mig.config.state"
MAX_EVENTS = 1000  # progress lines kept per job
CHECK_EVERY_S = 1.0  # how often a watch asks whether its client is still there

ResultListener = Callable[[JobRecord], None]
StateListener = Callable[[str, str], None]  # (config, pending|success|failed)


class JobRefused(Exception):
    """A job request the runner turns down (busy, unknown config, infeasible, no file)."""


class _Interrupted(Exception):
    """The daemon stops during an apply: it ends after the step in progress, journalled."""


class MigJobHost(Protocol):
    """What the runner needs from plugin.daemon.core.Daemon."""

    nvml: Nvml | None
    config: Any
    config_path: Path | None
    mps_supervisor: Any
    mps_held: frozenset[str]

    @property
    def plan(self) -> Plan:
        """The Plan now served."""

    @property
    def phase(self) -> str:
        """`starting`, `running`, or `stopping` (from stop() on)."""

    def reload(self, *, drop_overlay: str | None = None, node_changed: bool = False) -> bool:
        """Read config and node again and serve the new Plan's diff, dropping the overlay
        source `drop_overlay` with it; `node_changed`: a bad config file leaves the config in
        effect, the node is still read again."""

    def set_health_overlay(self, overlay: dict[str, str], *, source: str) -> None:
        """Publish one source's part of the health overlay."""

    def add_plan_listener(self, listener: Callable[..., None]) -> None:
        """Call `listener(plan, inventory)` after every applied Plan."""


@dataclass(frozen=True)
class JobSettings:
    """`migReconfiguration` as a job needs it."""

    config_file: Path | None = None
    drain_timeout_s: float = 300.0
    kill_processes: bool = False


class MigJobRunner:
    """Runs reconfiguration jobs for one daemon, one at a time, each on its own thread."""

    def __init__(
        self,
        host: MigJobHost,
        store: JobStore,
        *,
        engine: MigEngine,
        kill: ProcessKiller | None = None,
        drain_poll_s: float = DRAIN_POLL_S,
    ) -> None:
        self.host = host
        self.store = store
        self.engine = engine
        self._kill = kill
        self._drain_poll_s = drain_poll_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._current: JobRecord | None = None
        self._events: list[str] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listeners: list[ResultListener] = []
        self._state_listeners: list[StateListener] = []
        self._node: tuple[str, ...] = ()  # GPU UUIDs by index of the node the job plans for
        self._disabled = ""  # why jobs cannot run (no state directory), or ""
        self._last_gpu = -1  # GPU of the last apply step reported
        self._skipped: set[tuple[int, str]] = set()  # (running job, config) fires recorded
        host.add_plan_listener(self._plan_served)

    # --- seams ---------------------------------------------------------------------------------

    def add_result_listener(self, listener: ResultListener) -> None:
        """Call `listener(record)` whenever a job ends (success or failed)."""
        self._listeners.append(listener)

    def add_state_listener(self, listener: StateListener) -> None:
        """Call `listener(config, state)` whenever the job state the node labels carry changes
        (pending when a job starts draining, success or failed when it ends)."""
        self._state_listeners.append(listener)

    def publish_state(self) -> None:
        """Tell the state listeners the current job state (the daemon's labels file)."""
        labels = dict(self.labels())
        if not labels:
            return
        config, state = labels[CONFIG_LABEL], labels[STATE_LABEL]
        for listener in self._state_listeners:
            try:
                listener(config, state)
            except ValueError as err:  # a config name that is not a label value
                log.warning("MIG job state not published in the node labels: %s", err)

    def labels(self) -> tuple[tuple[str, str], ...]:
        """`nvidia.com/mig.config` and `.state` of the running or last job (none before any);
        a request refused at planning (unknown config, infeasible) leaves them as they were."""
        job = self._current or next(
            (j for j in reversed(self.store.jobs()) if not j.refused), None
        )
        if job is None:
            return ()
        state = "pending" if not job.done else job.result
        return ((CONFIG_LABEL, job.config), (STATE_LABEL, state))

    def disable(self, reason: str) -> None:
        """Refuse every job from now on, saying `reason`."""
        self._disabled = reason

    def current(self) -> JobRecord | None:
        """The running job, or None."""
        return self._current

    def settings(self) -> JobSettings:
        """The daemon's current `migReconfiguration`, configFile resolved against the config."""
        section = getattr(self.host.config, "mig_reconfiguration", None)
        if section is None:
            return JobSettings()
        path = Path(section.config_file) if section.config_file else None
        if path is not None and not path.is_absolute() and self.host.config_path is not None:
            path = Path(self.host.config_path).parent / path
        return JobSettings(path, section.drain_timeout_s, section.kill_processes)

    def _plan_served(self, _plan: object = None, _inventory: object = None) -> None:
        """A Plan read after the node changed is served: no device a job destroyed is left."""
        self.host.set_health_overlay({}, source=STALE_SOURCE)

    # --- requests ------------------------------------------------------------------------------

    def submit(
        self, config: str, *, text: str | None = None, file_name: str = "",
        source: str = "request",
    ) -> JobRecord:
        """Plan `config` and start the job; returns its record (ended already if nothing to do).

        `text` is the mig-parted file's content; None reads `migReconfiguration.configFile`.

        Raises:
            JobRefused: a job is running, there is no file, NVML is unavailable, or the plan is
                refused (unknown config, infeasible layout); refused plans are recorded too.
        """
        with self._lock:
            if self._current is not None and not self._current.done:
                job = self._current
                busy = (f"job {job.id} (config {job.config}, {job.phase}) is running; one job "
                        "runs at a time")
                if source == "schedule" and (job.id, config) not in self._skipped:
                    # nobody waits for the answer: the history keeps it, once per running job
                    # (an entry firing every minute must not push the real jobs out)
                    self._skipped.add((job.id, config))
                    skipped = JobRecord(self.store.new_id(), config, source, file_name,
                                        time.time(), refused=True)
                    self.store.save(skipped.finished("failed", f"schedule skipped: {busy}"))
                raise JobRefused(f"{busy}: try again when it ends (`gpushare mig status`)")
            if self._stopping.is_set():
                raise JobRefused("the daemon is stopping")
            if self._disabled:
                raise JobRefused(f"MIG reconfiguration jobs are disabled: {self._disabled}")
            nvml = self.host.nvml
            if nvml is None:
                self._refuse_fire(source, config, file_name,
                                  "NVML is unavailable on this node: no MIG job can run")
            if text is None:
                path = self.settings().config_file
                if path is None:
                    self._refuse_fire(source, config, file_name, "no mig-parted file: pass -f "
                                      "FILE or set migReconfiguration.configFile")
                try:
                    text, file_name = read_mig_file(path), str(path)
                except SharingError as err:
                    self._refuse_fire(source, config, str(path), str(err))
            record = JobRecord(self.store.new_id(), config, source, file_name, time.time())
            self._current, self._events = record, []
        try:
            plan = self.engine.plan(nvml, text, file_name or "<request>", config)
            self.engine.check_journal(self.store.journal_path, plan.node)
        except SharingError as err:
            refused = replace(record, refused=True)
            self._end(refused.finished("failed", f"refused: {err}"))
            raise JobRefused(str(err)) from None
        except BaseException:
            self._end(record.finished("failed", "planning failed unexpectedly"))
            raise
        outcomes = _planned(plan)
        if not plan.changed_gpus:
            self._end(record.finished("success", "already applied: no GPU changes", outcomes))
            return self.store.last() or record
        record = replace(record, phase="draining", gpus=outcomes)
        self._node, self._last_gpu = tuple(plan.node), -1
        try:
            self.store.set_active(ActiveJob(record, text, self._node))
        except OSError as err:
            self._end(record.finished("failed", f"cannot write the job state: {err}"))
            raise JobRefused(
                f"cannot write the job state under {self.store.state_dir}: {err}"
            ) from None
        self._update(record, f"job {record.id}: {config} changes GPUs "
                     f"{_indices(plan.changed_gpus)}; draining them")
        self.publish_state()
        self._thread = threading.Thread(
            target=self._run_guarded, args=(record, plan, text), name=f"mig-job-{record.id}",
            daemon=True,
        )
        self._thread.start()
        return record

    def _refuse_fire(self, source: str, config: str, file_name: str, reason: str) -> NoReturn:
        """Refuse a request; a schedule's fire (nobody waits for its answer) is recorded in the
        history as well, like a refused plan.

        Raises:
            JobRefused: always, saying `reason`.
        """
        if source == "schedule":
            record = JobRecord(self.store.new_id(), config, source, file_name, time.time(),
                               refused=True)
            self.store.save(record.finished("failed", f"refused: {reason}"))
        raise JobRefused(reason)

    def watch(
        self, job_id: int, emit: Callable[[str], None], timeout_s: float | None, *,
        check: Callable[[], None] | None = None, check_every_s: float = CHECK_EVERY_S,
    ) -> JobRecord:
        """Send the job's progress lines to `emit` until it ends; returns its final record.

        `check` is called at least every `check_every_s` while no line comes (a drain can be
        silent for its whole timeout); an exception it raises ends the watch (the job goes on):
        a control client that went away gives its slot back this way.

        Raises:
            TimeoutError: it did not end within `timeout_s`.
            KeyError: no such job.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sent = 0
        while True:
            with self._lock:
                running = self._current is not None and self._current.id == job_id
                events = self._events[sent:] if running else []
                if running and not events:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"job {job_id} still running")
                    if check is not None:
                        left = check_every_s if left is None else min(left, check_every_s)
                    self._changed.wait(timeout=left)
            if check is not None:
                check()
            if running and not events:
                continue
            for line in events:
                emit(line)
            sent += len(events)
            if not running:
                found = [j for j in self.store.jobs() if j.id == job_id]
                if not found:
                    raise KeyError(job_id)
                return found[0]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs; a draining job fails at once, an applying one stops after the step
        in progress (its journal says how far it got: the next start rolls it forward and
        records how the job ended); waits up to `timeout_s` for the job's thread."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # --- the job -------------------------------------------------------------------------------

    def _run_guarded(self, record: JobRecord, plan: MigPlan, text: str) -> None:
        """The job's thread: an unexpected error still ends the job (and frees the runner)."""
        try:
            self._run(record, plan, text)
        except Exception as err:  # noqa: BLE001 (logged; the runner must take the next job)
            log.exception("MIG job %d failed unexpectedly", record.id)
            self.host.mps_held = frozenset()
            self.host.set_health_overlay({}, source=OVERLAY_SOURCE)
            self.host.set_health_overlay({}, source=MPS_SOURCE)
            if self.host.mps_supervisor is not None:
                self.host.mps_supervisor.update(self.host.plan)
            if self._current is not None and self._current.id == record.id:
                self._end(self._current.finished("failed", f"internal error: {err}"))

    def _run(self, record: JobRecord, plan: MigPlan, text: str) -> None:
        nvml = self.host.nvml
        assert nvml is not None
        affected = {g.uuid: g.index for g in plan.gpus if g.changed}
        drain = Drain(
            self.host, affected, reason=f"MIG reconfiguration job {record.id} to {record.config}",
            progress=lambda line: self._update(record, line), kill=self._kill,
            stopping=self._stopping, poll_s=self._drain_poll_s,
        )
        drain.begin()
        settings = self.settings()
        try:
            drain.wait(nvml, settings.drain_timeout_s, settings.kill_processes)
        except (DrainCancelled, TimeoutError, SharingError) as err:
            drain.undo()
            gpus = tuple(
                replace(g, outcome="untouched", detail=str(err)) if g.uuid in affected else g
                for g in record.gpus
            )
            self._end(record.finished("failed", f"drain: {err}; nothing was changed", gpus))
            return
        record = replace(record, phase="applying")
        self._update(record, "no compute processes left: applying", active_text=text)
        self._finish(record, nvml, plan, text, drain)

    def _finish(
        self, record: JobRecord, nvml: Nvml, plan: MigPlan, text: str, drain: Drain
    ) -> None:
        """Apply, verify, reload and record; the devices come back with the new Plan."""
        try:
            outcomes, error = self._apply(record, nvml, plan, text)
        except _Interrupted:
            self._update(record, "the daemon is stopping: the apply stopped after its last "
                         "journalled step; the next start rolls it forward")
            return  # the active-job file stays: the next start closes the job
        drain.applied()
        record = replace(record, phase="reloading")
        self._update(record, "reading the node again and serving the new plan")
        served = self.host.reload(drop_overlay=OVERLAY_SOURCE, node_changed=True)
        if not served and self.host.phase == "stopping":  # the next start serves the layout
            self._update(record, "the daemon is stopping: its next start serves the new layout")
        elif not served:
            why = getattr(self.host, "reload_error", "") or "see the daemon log"
            changed = {o.uuid for o in outcomes if o.outcome in ("reconfigured", "failed")}
            if changed:
                drain.stale(changed, f"MIG job {record.id} changed this GPU; no plan serves it")
            error = (f"the new layout cannot be served with the config in effect: {why}; the "
                     "devices it replaced stay Unhealthy until a config that serves the node is "
                     f"loaded{'; ' + error if error else ''}")
        drain.end()  # marks gone with the new Plan (or now, if it was not served); MPS back
        if error:
            self._end(record.finished("failed", error, outcomes))
        else:
            self._end(record.finished("success", f"applied {record.config}", outcomes))

    def _apply(
        self, record: JobRecord, nvml: Nvml, plan: MigPlan, text: str
    ) -> tuple[tuple[GpuOutcome, ...], str]:
        """Apply and verify (a fresh plan has nothing left to do): per-GPU outcomes, error."""
        try:
            result = self.engine.apply(
                nvml, plan, journal_path=self.store.journal_path,
                on_step=lambda event: self._step(record, event),
            )
        except SharingError as err:  # refused before any GPU was touched
            reason = f"apply refused: {err}"
            return _outcomes(plan, None, (), reason), f"{reason}; nothing was changed"
        return self._verify(record, nvml, plan, text, result)

    def _verify(
        self, record: JobRecord, nvml: Nvml, plan: MigPlan, text: str,
        result: ApplyResult | None,
    ) -> tuple[tuple[GpuOutcome, ...], str]:
        record = replace(record, phase="verifying")
        self._update(record, "verifying the layout")
        failed = [g for g in (result.gpus if result else ()) if g.result == "failed"]
        error = "; ".join(f"{g.label}: {g.reason}" for g in failed)
        try:
            left = self.engine.plan(nvml, text, plan.source, record.config).changed_gpus
        except SharingError as err:
            left = plan.changed_gpus
            error = error or f"verify: {err}"
        if left and not error:
            error = f"GPUs {_indices(left)} still differ from {record.config}"
        outcomes = _outcomes(plan, result, left, error)
        return outcomes, (f"apply: {error}" if error else "")

    def _step(self, record: JobRecord, event: StepEvent) -> None:
        """Progress for clients: each GPU's first step, and every failed one (the apply engine
        logs every step itself). Once the daemon stops, the apply ends after this step.

        Raises:
            _Interrupted: the daemon is stopping and this step has ended (journalled).
        """
        if event.phase != "started" and self._stopping.is_set():
            raise _Interrupted
        if event.phase == "failed":
            self._update(record, f"{event.step.describe()} failed: {event.error}", log_it=False)
        elif event.phase == "started" and event.step.gpu != self._last_gpu:
            self._last_gpu = event.step.gpu
            self._update(record, f"GPU {event.step.gpu}: applying its new layout", log_it=False)

    # --- bookkeeping ---------------------------------------------------------------------------

    def _update(
        self, record: JobRecord, line: str, active_text: str | None = None, log_it: bool = True
    ) -> None:
        """Publish the job's new state and a progress line (logged unless `log_it` is false);
        with `active_text`, write the active-job file first."""
        if log_it:
            log.info("MIG job %d: %s", record.id, line.removeprefix(f"job {record.id}: "))
        with self._lock:
            self._current = record
            if len(self._events) < MAX_EVENTS:
                self._events.append(line)
            self._changed.notify_all()
        if active_text is not None:
            try:
                self.store.set_active(ActiveJob(record, active_text, self._node))
            except OSError as err:
                log.error("updating the active MIG job file failed: %s", err)

    def _end(self, record: JobRecord) -> None:
        """Record the ended job, drop the active file, publish its state, tell the listeners;
        only then is the runner free (and a client waiting for the job answered)."""
        self.store.save(record)
        try:
            self.store.set_active(None)
        except OSError as err:
            log.error("removing the active MIG job file failed: %s", err)
        level = logging.INFO if record.result == "success" else logging.ERROR
        log.log(level, "MIG job %d (%s) %s: %s", record.id, record.config, record.result,
                record.reason)
        if not record.refused:
            with self._lock:
                self._current = record  # ended: the labels show its result
            self.publish_state()
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # noqa: BLE001 (a listener must not break the job runner)
                log.exception("a MIG job listener failed")
        with self._lock:
            self._current = None
            self._skipped.clear()
            self._changed.notify_all()

    # --- restart after a crash -----------------------------------------------------------------

    def resume(self, nvml: Nvml | None) -> None:
        """Before the daemon serves: roll an interrupted apply forward and close the job a
        previous daemon left (plugin.daemon.mig_resume)."""
        resume(self, nvml)

    def end_job(self, record: JobRecord) -> None:
        """Record an ended job (for the restart logic): history, labels, listeners."""
        self._end(record)


def _outcomes(
    plan: MigPlan, result: ApplyResult | None, left: Sequence[int], error: str
) -> tuple[GpuOutcome, ...]:
    """Per selected GPU: unchanged, reconfigured, failed, or untouched (apply refused)."""
    by_index = {g.index: g for g in result.gpus} if result is not None else {}
    out = []
    for g in plan.gpus:
        if g.request is None:
            continue
        applied = by_index.get(g.index)
        if not g.changed:
            out.append(GpuOutcome(g.index, g.uuid, "unchanged"))
        elif result is None:
            out.append(GpuOutcome(g.index, g.uuid, "untouched", error))
        elif (applied is not None and applied.result == "failed") or g.index in left:
            reason = applied.reason if applied is not None and applied.reason else error
            out.append(GpuOutcome(g.index, g.uuid, "failed", reason))
        else:
            out.append(GpuOutcome(g.index, g.uuid, "reconfigured", _layout(g)))
    return tuple(out)


def _planned(plan: MigPlan) -> tuple[GpuOutcome, ...]:
    """Per selected GPU: `untouched` where the plan changes it (so far), else `unchanged`."""
    return tuple(
        GpuOutcome(g.index, g.uuid, "untouched" if g.changed else "unchanged",
                   f"{g.current} -> {_layout(g)}" if g.changed else "")
        for g in plan.gpus if g.request is not None
    )


def _layout(gpu_plan: GpuPlan) -> str:
    desired = gpu_plan.desired
    return desired.describe() if desired is not None else ""


def _indices(indices: Sequence[int]) -> str:
    return ", ".join(map(str, indices))


__all__ = [
    "CONFIG_LABEL",
    "STATE_LABEL",
    "JobRefused",
    "JobSettings",
    "MigJobRunner",
]
