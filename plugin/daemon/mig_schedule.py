"""Scheduled MIG reconfiguration: `migReconfiguration.schedule` entries fired by APScheduler.

A BackgroundScheduler (its own threads) holds one cron job per entry; each fire submits a
reconfiguration job like `gpushare mig reconfigure` would. A fire while another job runs is
skipped and logged (the entry fires again at its next time). The schedule follows config
reloads: when the entries change, the jobs are replaced. Cron times are in the daemon's local
time zone (`TZ`, else /etc/localtime of its container: UTC in most images), which the log line
naming the entries states along with each entry's next fire time.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfoNotFoundError

from apscheduler.schedulers.background import BackgroundScheduler

from plugin.daemon.mig_jobs import JobRefused, MigJobRunner
from sharing.config_models import MigScheduleEntry
from sharing.cron import cron_trigger
from sharing.errors import ConfigError

log = logging.getLogger("gpushare.mig.schedule")

MISFIRE_GRACE_S = 60  # a fire missed (daemon busy or suspended) this long ago still runs


class MigScheduler:
    """Fires the configured schedule entries; a daemon Component and plan listener."""

    def __init__(self, runner: MigJobRunner, *, timezone: Any = None) -> None:
        """`timezone` None: the local one (TZ, else /etc/localtime).

        Raises:
            ConfigError: TZ names no time zone.
        """
        self.runner = runner
        kwargs = {"timezone": timezone} if timezone is not None else {}
        try:
            self._scheduler = BackgroundScheduler(**kwargs)
        except ZoneInfoNotFoundError:  # the local zone: TZ names none
            raise ConfigError(
                f"TZ={os.environ.get('TZ', '')[:64]!r} is not a time zone: set an IANA name "
                "such as Europe/Berlin or UTC, or unset it for /etc/localtime (the MIG "
                "schedule's cron times are read in it)"
            ) from None
        self._entries: tuple[MigScheduleEntry, ...] = ()
        self._lock = threading.Lock()
        self._logged = False  # a schedule was logged (so its removal is logged too)

    def start(self) -> None:
        """Start firing entries (those added before start are kept)."""
        self._scheduler.start()

    def stop(self) -> None:
        """Stop firing; a job already submitted runs on (the runner stops it). Safe twice."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def follow(self, _plan: object = None, _inventory: object = None) -> None:
        """Take the schedule of the daemon's current config (a plan listener)."""
        section = getattr(self.runner.host.config, "mig_reconfiguration", None)
        self.set_entries(section.schedule if section is not None else ())

    def set_entries(self, entries: tuple[MigScheduleEntry, ...]) -> None:
        """Replace the scheduled jobs when the entries differ from the current ones."""
        with self._lock:
            if entries == self._entries:
                return
            self._scheduler.remove_all_jobs()
            for i, entry in enumerate(entries):
                self._scheduler.add_job(
                    self._fire, cron_trigger(entry.cron, self._scheduler.timezone),
                    args=(entry.config, entry.cron), id=f"mig-schedule-{i}",
                    name=f"{entry.cron} -> {entry.config}", coalesce=True, max_instances=1,
                    misfire_grace_time=MISFIRE_GRACE_S,
                )
            self._entries = tuple(entries)
        if entries or self._logged:
            self._logged = bool(entries)
            described = "; ".join(
                f"{e['cron']} -> {e['config']} (next {e['next_run'] or 'never'})"
                for e in self.entries()
            )
            log.info("MIG schedule in time zone %s: %s", self._scheduler.timezone,
                     described or "no entries")

    def entries(self) -> list[dict[str, Any]]:
        """Each entry with its next fire time (ISO, or None when it never fires again)."""
        with self._lock:
            jobs = {job.id: job for job in self._scheduler.get_jobs()}
            out = []
            for i, entry in enumerate(self._entries):
                job = jobs.get(f"mig-schedule-{i}")
                when = _next_run(job)
                out.append({"cron": entry.cron, "config": entry.config,
                            "next_run": when.isoformat() if when else None})
            return out

    def _fire(self, config: str, cron: str) -> None:
        log.info("MIG schedule %r fires: reconfiguring to %s", cron, config)
        try:
            self.runner.submit(config, source="schedule")
        except JobRefused as err:
            log.warning("scheduled MIG reconfiguration to %s not started: %s", config, err)


def _next_run(job: Any) -> datetime | None:
    """A job's next fire time; before the scheduler starts, computed from its trigger."""
    if job is None:
        return None
    when = getattr(job, "next_run_time", None)
    if when is not None:
        return when
    now = datetime.now(job.trigger.timezone)
    return job.trigger.get_next_fire_time(None, now)


__all__ = ["MigScheduler"]
