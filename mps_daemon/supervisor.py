"""MpsSupervisor: one control daemon per MPS resource of the applied Plan, kept answering.

A daemon Component (start/stop) and a plan listener (`update`). On each Plan it starts daemons
for new MPS resources, stops those that vanished and restarts only those whose MpsSpec changed:
a changed default limit applies only to the next MPS server (facts §4), so a restart is the
honest way to apply it. Its own thread checks every `tick_s` that each child still runs and
probes it every `probe_interval_s`; a daemon that exited or answers wrongly is reported
`down(resource, reason)` and restarted with exponential backoff, then reported `up(resource)`
once it answers again; the backoff starts over only after the daemon stayed up `stable_s`.
Every transition is logged once, with the resource and the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mps_daemon.control import (
    COMPUTE_MODE_POLICIES,
    MANAGE_COMPUTE_MODE,
    MpsControlDaemon,
    MpsDaemonError,
)
from mps_daemon.runner import CommandRunner
from sharing.plan_types import MpsSpec, Plan

log = logging.getLogger("gpushare.mps")

TICK_S = 0.1  # how often each child's liveness is checked (a cheap waitpid)
PROBE_INTERVAL_S = 2.0  # how often each daemon is asked its thread percentage
BACKOFF_S = 0.2  # first restart delay; doubles per consecutive failure
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a daemon up this long has its backoff reset; a flapping one keeps growing it


@dataclass
class _Entry:
    """One supervised daemon and what was last reported about it."""

    daemon: MpsControlDaemon
    up: bool | None = None  # None until the first start attempt
    reason: str = ""
    failures: int = 0
    retry_at: float = 0.0
    probe_at: float = 0.0
    stable_at: float = 0.0  # when a restarted daemon counts as stable (its backoff is reset)


def _changed_fields(old: MpsSpec, new: MpsSpec) -> list[str]:
    """Names of the MpsSpec fields that differ."""
    return [f.name for f in dataclasses.fields(MpsSpec)
            if getattr(old, f.name) != getattr(new, f.name)]


class MpsSupervisor:
    """Runs and watches the MPS control daemons the Plan asks for."""

    def __init__(
        self,
        *,
        control_binary: str | Sequence[str],
        down: Callable[[str, str], None],
        up: Callable[[str], None],
        nvml: Any = None,
        env: Mapping[str, str] | None = None,
        runner: CommandRunner | None = None,
        compute_mode: str = MANAGE_COMPUTE_MODE,
        tick_s: float = TICK_S,
        probe_interval_s: float = PROBE_INTERVAL_S,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        stable_s: float = STABLE_S,
        restarted: Callable[[str], None] | None = None,
        daemon_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self._control = control_binary
        self._restarted = restarted
        self._down, self._up = down, up
        self._nvml, self._env, self._runner = nvml, dict(env or {}), runner
        if compute_mode not in COMPUTE_MODE_POLICIES:
            raise ValueError(f"compute mode policy must be manage or leave, got {compute_mode!r}")
        self._compute_mode = compute_mode
        self._tick_s, self._probe_s = tick_s, probe_interval_s
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        self._stable_s = stable_s
        self._timeouts = dict(daemon_timeouts or {})  # MpsControlDaemon's *_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._pending: Plan | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._abandoned = False
        self._thread: threading.Thread | None = None

    # -- control (any thread) ------------------------------------------------------------------

    def update(self, plan: Plan, _inventory: object = None) -> None:
        """Follow a newly applied Plan (a plan listener); the work happens on our thread."""
        with self._lock:
            self._pending = plan
        self._wake.set()

    def abandon(self) -> None:
        """A stop is coming: starts in progress, and those not begun, give up (safe from a
        signal handler); stop() must follow."""
        self._abandoned = True
        self._stopping.set()
        self._wake.set()

    def start(self) -> None:
        """Start the daemons of the pending Plan now, then watch them on our own thread."""
        if self._thread is not None:
            return
        if not self._abandoned:
            self._stopping.clear()
        self._take_pending()
        self._thread = threading.Thread(target=self._run, name="gpushare-mps", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and stop every daemon (`quit`, then signals); safe to call twice."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        entries, self._entries = list(self._entries.items()), {}
        # The processes are stopped side by side: each may take its command and stop timeouts
        # (a wedged daemon), and one after another they could outlast the pod's grace period.
        stoppers = [threading.Thread(target=e.daemon.stop_process, name=f"gpushare-mps-stop-{n}",
                                     daemon=True) for n, e in entries]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for name, entry in entries:
            entry.daemon.stop()  # the process is gone; this restores the compute modes
            log.info("%s: MPS control daemon stopped", name, extra={"resource": name})

    def daemon(self, resource: str) -> MpsControlDaemon | None:
        """The control daemon of a resource, or None (for inspection)."""
        entry = self._entries.get(resource)
        return entry.daemon if entry else None

    @property
    def alive(self) -> bool:
        """True while the supervision thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def healthy(self) -> dict[str, bool | None]:
        """Resource -> last reported state (None: not started yet)."""
        return {name: e.up for name, e in list(self._entries.items())}

    # -- the loop (own thread) -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._take_pending()
                self._check_all(time.monotonic())
            except Exception:  # noqa: BLE001 - supervision must outlive any one failure
                log.exception("MPS supervision: unexpected error; going on")

    def _take_pending(self) -> None:
        with self._lock:
            plan, self._pending = self._pending, None
        if plan is not None:
            self._reconcile(plan)

    def _reconcile(self, plan: Plan) -> None:
        """Start new, stop vanished, restart changed daemons; unchanged ones are left alone."""
        wanted = {r.name: r.mps for r in plan.resources if r.mps is not None}
        root = plan.options.mps_root
        for name in [n for n in self._entries if n not in wanted]:
            entry = self._entries[name]
            entry.daemon.stop()
            del self._entries[name]
            log.info("%s: MPS control daemon stopped (the resource left the plan)", name,
                     extra={"resource": name})
            if entry.up is False:
                self._up(name)
        for name, spec in wanted.items():
            entry = self._entries.get(name)
            if entry is not None and entry.daemon.spec == spec and entry.daemon.mps_root == root:
                continue
            if entry is not None:
                changed = _changed_fields(entry.daemon.spec, spec) or ["mpsRoot"]
                log.info("%s: MPS spec changed (%s): restarting its control daemon, since a new "
                         "default limit applies only to the next MPS server", name,
                         ", ".join(changed), extra={"resource": name})
                entry.daemon.stop()
            new = _Entry(self._new_daemon(spec, root), up=entry.up if entry else None)
            self._entries[name] = new
            self._try_start(name, new, time.monotonic())

    def _new_daemon(self, spec: MpsSpec, root: str) -> MpsControlDaemon:
        return MpsControlDaemon(
            spec, control_binary=self._control, mps_root=root, nvml=self._nvml, env=self._env,
            runner=self._runner, compute_mode=self._compute_mode, cancel=self._stopping,
            **self._timeouts,
        )

    def _check_all(self, now: float) -> None:
        for name, entry in list(self._entries.items()):
            if self._stopping.is_set():
                return
            if entry.up is not True:
                if now >= entry.retry_at:
                    self._try_start(name, entry, now)
            elif not entry.daemon.running:
                self._failed(name, entry, f"control daemon exited with status "
                                          f"{entry.daemon.exit_status()}", now)
            elif now >= entry.probe_at:
                try:
                    entry.daemon.probe()
                    entry.probe_at = now + self._probe_s
                except MpsDaemonError as err:
                    self._failed(name, entry, f"probe failed: {err}", now)
                    continue
                if entry.failures and now >= entry.stable_at:
                    entry.failures = 0  # up long enough: the next failure starts over

    def _try_start(self, name: str, entry: _Entry, now: float) -> None:
        try:
            entry.daemon.start()
        except MpsDaemonError as err:
            if self._stopping.is_set():
                return  # abandoned for the stop: not a failure to report
            self._failed(name, entry, str(err), now)
            return
        if entry.failures and self._restarted is not None:
            self._restarted(name)  # a start after it exited, failed its probe or its start
        # The backoff is reset only once the daemon stays up (see _check_all): one that
        # answers and dies again at once would otherwise be restarted every backoff_s forever.
        entry.probe_at, entry.stable_at = now + self._probe_s, now + self._stable_s
        if entry.up is not True:
            entry.up, entry.reason = True, ""
            log.info("%s: MPS control daemon answers (pid %s); limits %s", name,
                     entry.daemon.pid, "; ".join(entry.daemon.limit_commands()),
                     extra={"resource": name})
            self._up(name)

    def _failed(self, name: str, entry: _Entry, reason: str, now: float) -> None:
        """Report down once per transition; schedule the restart with backoff."""
        entry.daemon.stop_process()
        entry.failures += 1
        delay = min(self._backoff_s * 2 ** (entry.failures - 1), self._max_backoff_s)
        entry.retry_at = now + delay
        if entry.up is False:
            log.debug("%s: MPS control daemon still down (%s); next try in %.1fs",
                      name, reason, delay)
            return
        entry.up, entry.reason = False, reason
        log.error("%s: MPS control daemon down: %s; its devices are Unhealthy; restarting "
                  "with backoff (first try in %.1fs)", name, reason, delay,
                  extra={"resource": name})
        self._down(name, reason)
