"""Wiring of MIG reconfiguration jobs into the daemon: runner, schedule, control socket, labels.

`add_mig_jobs(daemon, ...)` creates the job runner over `--state-dir`, rolls an unfinished job
forward before the daemon serves (a startup hook), publishes the job state in the daemon's node
labels file (`daemon.set_mig_state`) and counts ended jobs in its metrics
(`gpushare_mig_reconfigurations_total{result}`), runs the schedule, and serves `reconfigure` and
`status` on the control socket.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plugin.daemon.control import (
    DEFAULT_CONTROL_SOCKET,
    ControlError,
    ControlServer,
    Emit,
    Message,
)
from plugin.daemon.mig_drain import ProcessKiller
from plugin.daemon.mig_engine import MAX_MIG_FILE_BYTES, MigEngine
from plugin.daemon.mig_history import DEFAULT_STATE_DIR, JobStore
from plugin.daemon.mig_jobs import JobRefused, MigJobRunner
from plugin.daemon.mig_schedule import MigScheduler
from sharing.config_models import MAX_MIG_CONFIG_NAME

log = logging.getLogger("gpushare.mig.jobs")

MAX_FILE_NAME = 4096
_RECONFIGURE_KEYS = {"op", "config", "file_text", "file_name", "wait"}
_STATUS_KEYS = {"op"}


class _RunnerComponent:
    """Stops the runner with the daemon (a draining job fails; an applying one finishes)."""

    def __init__(self, runner: MigJobRunner) -> None:
        self.runner = runner

    def start(self) -> None:
        """Nothing to start: jobs start on request."""

    def stop(self) -> None:
        """Refuse new jobs and let the current one reach a safe point; then end the process
        that parses mig-parted files."""
        self.runner.stop()
        self.runner.engine.close()


class _DefaultControlServer(ControlServer):
    """The control socket at its default path: one that cannot be bound (not root, no /run)
    is logged and left out instead of stopping the daemon."""

    def start(self) -> None:
        """Bind, or log why not."""
        try:
            super().start()
        except OSError as err:
            log.warning("no control socket (%s); `gpushare mig reconfigure|status` cannot "
                        "reach this daemon: pass --control-socket PATH", err)


def add_mig_jobs(
    daemon: Any,
    *,
    state_dir: Path,
    control_socket: Path | None,
    nvml_lib: object,
    default_state_dir: bool = False,
    default_socket: bool = False,
) -> MigJobRunner:
    """Add reconfiguration jobs to a daemon before it starts; returns the runner.

    The runner is also `daemon.mig_jobs`, so other parts can listen to job results. A state
    directory or control socket at its default path (`default_*`: not given on the command
    line) that cannot be created disables that part with a warning; a given one stops the start.
    """
    store = JobStore(state_dir)
    runner = MigJobRunner(daemon, store, engine=MigEngine(), kill=process_killer_for(nvml_lib))
    scheduler = MigScheduler(runner)

    def before_serving(nvml: Any) -> None:
        try:
            store.open()
        except OSError as err:
            # mkdir(exist_ok=True) says "File exists" when the path (or a parent) is a file
            why = "not a directory" if isinstance(err, FileExistsError) else err.strerror or err
            if not default_state_dir:
                raise OSError(f"state directory {state_dir}: {why}") from None
            reason = f"no state directory ({state_dir}: {why}; see --state-dir)"
            log.warning("MIG reconfiguration jobs disabled: %s", reason)
            runner.disable(reason)
            return
        runner.resume(nvml)
        runner.publish_state()  # the labels say how the last job ended, after a restart too

    set_mig_state = getattr(daemon, "set_mig_state", None)
    if set_mig_state is not None:
        runner.add_state_listener(set_mig_state)
    metrics = getattr(daemon, "metrics", None)
    if metrics is not None:
        runner.add_result_listener(lambda record: metrics.mig_reconfiguration(record.result))
    daemon.add_startup_hook(before_serving)
    daemon.add_plan_listener(scheduler.follow)
    daemon.add_component(scheduler)
    daemon.add_component(_RunnerComponent(runner))
    if control_socket is not None:
        server_class = _DefaultControlServer if default_socket else ControlServer
        daemon.add_component(server_class(control_socket, control_handlers(runner, scheduler)))
    daemon.mig_jobs = runner
    return runner


def control_handlers(
    runner: MigJobRunner, scheduler: MigScheduler
) -> dict[str, Callable[[Message, Emit], Message]]:
    """The control socket's `reconfigure` and `status` requests."""

    def reconfigure(request: Message, emit: Emit) -> Message:
        _check_keys(request, _RECONFIGURE_KEYS)
        config = _text(request, "config", MAX_MIG_CONFIG_NAME, required=True)
        text = _text(request, "file_text", MAX_MIG_FILE_BYTES)
        file_name = _text(request, "file_name", MAX_FILE_NAME) or ""
        wait = request.get("wait", False)
        if not isinstance(wait, bool):
            raise ControlError("bad request: wait must be true or false")
        try:
            record = runner.submit(config, text=text, file_name=file_name)
        except JobRefused as err:
            raise ControlError(str(err)) from None
        if wait and not record.done:
            record = runner.watch(
                record.id, lambda line: emit({"event": "progress", "message": line}), None,
                check=emit.check,  # a client that went away frees its slot within a second
            )
        return {"job": record.to_json()}

    def status(request: Message, _emit: Emit) -> Message:
        _check_keys(request, _STATUS_KEYS)
        settings = runner.settings()
        current = runner.current()
        return {
            "current": current.to_json() if current else None,
            "jobs": [j.to_json() for j in runner.store.jobs()],
            "schedule": scheduler.entries(),
            "config_file": str(settings.config_file) if settings.config_file else None,
            "drain_timeout_s": settings.drain_timeout_s,
            "kill_processes": settings.kill_processes,
        }

    return {"reconfigure": reconfigure, "status": status}


def _check_keys(request: Message, allowed: set[str]) -> None:
    unknown = sorted(set(request) - allowed)
    if unknown:
        shown = ", ".join(k[:40] for k in unknown[:5])
        raise ControlError(
            f"bad request: unknown field {shown} (allowed: {', '.join(sorted(allowed))})"
        )


def _text(request: Message, key: str, limit: int, *, required: bool = False) -> str | None:
    value = request.get(key)
    if value is None:
        if required:
            raise ControlError(f"bad request: {key} is required")
        return None
    if not isinstance(value, str) or (required and not value):
        raise ControlError(f"bad request: {key} must be a non-empty string")
    if len(value) > limit:
        raise ControlError(f"bad request: {key} is longer than {limit} characters")
    return value


def default_locations(nvml_lib: object) -> tuple[Path, Path]:
    """Default state directory and control socket: /var/lib/gpushare and
    /run/gpushare/control.sock, for a simulated node under its host/ directory (so a simulator
    never writes the host's, and `gpushare mig apply --node` shares the daemon's journal)."""
    from sharing.nvml.sim import SimNvml

    if isinstance(nvml_lib, SimNvml):
        return sim_locations(nvml_lib.state_dir)
    return Path(DEFAULT_STATE_DIR), Path(DEFAULT_CONTROL_SOCKET)


def sim_locations(sim_state_dir: Path) -> tuple[Path, Path]:
    """State directory and control socket of a daemon serving a simulated node's state dir."""
    from sharing.nvml.sim.state import HOST_DIR

    root = Path(sim_state_dir) / HOST_DIR
    return root / DEFAULT_STATE_DIR.lstrip("/"), root / DEFAULT_CONTROL_SOCKET.lstrip("/")


def process_killer_for(nvml_lib: object) -> ProcessKiller:
    """How `killProcesses` ends a compute process: the simulator stops its fake process; on a
    real node a signal (SIGTERM, then SIGKILL) to the host pid, which needs `hostPID: true`."""
    from sharing.nvml.sim import SimNvml

    if isinstance(nvml_lib, SimNvml):
        from sharing.nvml.sim import stop_process

        state_dir = nvml_lib.state_dir

        def stop_simulated(gpu: int, pid: int, _force: bool) -> None:
            stop_process(state_dir, gpu, pid=pid)

        return stop_simulated
    return _signal_process


def _signal_process(gpu: int, pid: int, force: bool) -> None:
    """SIGTERM (or SIGKILL with force) to a host pid NVML listed on `gpu`.

    Raises:
        OSError: the pid is not visible here (no hostPID) or may not be signalled.
    """
    if pid <= 1 or pid == os.getpid():
        raise OSError(f"refusing to signal pid {pid}")
    if not Path(f"/proc/{pid}").exists():
        raise OSError(f"pid {pid} (GPU {gpu}) is not visible here: run with hostPID to kill it")
    os.kill(pid, signal.SIGKILL if force else signal.SIGTERM)


__all__ = [
    "DEFAULT_STATE_DIR",
    "add_mig_jobs",
    "control_handlers",
    "default_locations",
    "process_killer_for",
    "sim_locations",
]
