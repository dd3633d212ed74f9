"""A daemon started after a crash: roll the interrupted MIG apply forward before serving.

The apply engine's journal (`<state-dir>/mig-journal.json`) says whether an apply was cut short
(a job's, or a killed `gpushare mig apply`'s); `resume_mig` converges the GPUs to what it asked
for. The job runner's active-job file says which job it was and how far it got: a job still
draining had touched nothing and is recorded failed; one that was applying is verified against
its mig-parted text and recorded success or failed. A journal that is corrupt or from another
node is logged in one line and left alone, nothing touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Protocol

from plugin.daemon.mig_engine import MigEngine
from plugin.daemon.mig_history import GpuOutcome, JobRecord, JobStore
from sharing.errors import SharingError
from sharing.nvml import Nvml
from sharing.nvml.mig_apply import ApplyResult

log = logging.getLogger("gpushare.mig.jobs")


class MigJobRunner(Protocol):
    """What the restart logic needs from plugin.daemon.mig_jobs.MigJobRunner."""

    store: JobStore
    engine: MigEngine

    def end_job(self, record: JobRecord) -> None:
        """Record an ended job: history, labels, listeners."""


def resume(runner: MigJobRunner, nvml: Nvml | None) -> None:
    """Roll forward what the journal records as interrupted and close the unfinished job."""
    store = runner.store
    try:
        active = store.active()
    except ValueError as err:
        log.error("unfinished MIG job unreadable: %s; left in place", err)
        active = None
    rolled, error = None, ""
    if nvml is not None:
        try:
            rolled = runner.engine.resume(
                nvml, journal_path=store.journal_path,
                on_step=lambda e: log.info("rolling forward: %s (%s)", e.step.describe(),
                                           e.phase),
            )
        except SharingError as err:
            error = f"interrupted MIG apply not rolled forward: {err}"
            log.error("%s; nothing touched", error)
    if active is None:
        if rolled is not None:
            _journal_only(runner, rolled)
        return
    record = replace(active.record, phase="verifying")
    if error:
        runner.end_job(record.finished("failed", f"{error}; nothing touched"))
    elif nvml is None:
        runner.end_job(record.finished("failed", "NVML is unavailable after a daemon restart"))
    elif active.record.phase in ("planning", "draining") and rolled is None:
        runner.end_job(record.finished(
            "failed", "the daemon stopped while the job was draining; nothing was changed"))
    else:
        _close_after_restart(runner, record, nvml, active.text, rolled)


def _close_after_restart(
    runner: MigJobRunner, record: JobRecord, nvml: Nvml, text: str, rolled: ApplyResult | None
) -> None:
    """Verify a job whose apply a previous daemon started, and record how it ended."""
    failed = {g.index: g.reason for g in (rolled.gpus if rolled else ()) if g.reason}
    try:
        plan = runner.engine.plan(nvml, text, record.file or "<request>", record.config)
    except SharingError as err:
        runner.end_job(record.finished("failed", f"verify after a daemon restart: {err}"))
        return
    left = set(plan.changed_gpus) | set(failed)
    outcomes = tuple(
        o if o.outcome != "untouched"
        else replace(o, outcome="failed", detail=failed.get(o.index, "still differs"))
        if o.index in left
        else replace(o, outcome="reconfigured")
        for o in record.gpus
    )
    how = "rolled forward" if rolled is not None else "had finished"
    if left:
        gpus = ", ".join(map(str, sorted(left)))
        reason = f"GPUs {gpus} differ from {record.config} after a daemon restart"
        runner.end_job(record.finished("failed", reason, outcomes))
    else:
        reason = f"applied {record.config} (the apply {how} across a daemon restart)"
        runner.end_job(record.finished("success", reason, outcomes))


def _journal_only(runner: MigJobRunner, rolled: ApplyResult) -> None:
    """Record an interrupted apply that was not one of our jobs (`gpushare mig apply`)."""
    store = runner.store
    record = JobRecord(store.new_id(), rolled.config, "restart", str(store.journal_path),
                       time.time(), phase="verifying")
    outcomes = tuple(
        GpuOutcome(g.index, "", {"applied": "reconfigured"}.get(g.result, g.result),
                   g.reason or g.layout)
        for g in rolled.gpus if g.result != "untouched"
    )
    failed = [g for g in rolled.gpus if g.result == "failed"]
    if failed:
        reason = "; ".join(f"{g.label}: {g.reason}" for g in failed)
        runner.end_job(record.finished("failed", f"rolled forward: {reason}", outcomes))
    else:
        reason = f"rolled forward the interrupted apply of {rolled.config}"
        runner.end_job(record.finished("success", reason, outcomes))


__all__ = ["resume"]
