"""`gpushare mig reconfigure` and `gpushare mig status`: ask the running daemon, over its
control socket, to run a MIG reconfiguration job, and show the jobs it ran.

Exit status of `reconfigure`: 0 the job was started (or, with --wait, succeeded); 1 the job
failed (with --wait) or the daemon cannot be reached; 2 the request was refused (unknown config,
infeasible layout, another job running, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plugin.daemon.control import DEFAULT_CONTROL_SOCKET, ControlError, call
from plugin.daemon.mig_engine import read_mig_file
from plugin.daemon.mig_history import DEFAULT_STATE_DIR, read_history
from sharing.errors import SharingError
from sharing.ranges import index_ranges

EXIT_FAILED = 1
EXIT_REFUSED = 2
REASON_CHARS = 70  # of a reason in the status table (--format json has it whole)

RECONFIGURE_DESCRIPTION = """\
Ask the running daemon (`gpushare run`) to repartition the node's GPUs to config NAME of a
mig-parted file: FILE when given (read here and sent to the daemon), else the daemon's
migReconfiguration.configFile. The daemon plans first and refuses an unknown config or a layout
that does not fit, touching nothing. Then the virtual devices of the GPUs that change turn
Unhealthy at the kubelet, the daemon waits until no compute process runs there (up to
migReconfiguration.drainTimeout), applies the layout, and serves the new MIG resources without
a restart. One job runs at a time; a request while one runs is refused.

Exit status: 0 started (with --wait: succeeded), 1 failed or daemon unreachable, 2 refused.
"""


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--control-socket", metavar="PATH",
        help=f"the daemon's control socket (default {DEFAULT_CONTROL_SOCKET})",
    )
    where.add_argument(
        "--node", metavar="DIR", type=Path,
        help="reach the daemon serving this simulated node's state directory"
        " (its socket is DIR/host/run/gpushare/control.sock)",
    )


def _socket_path(args: argparse.Namespace) -> str:
    """The control socket the options name."""
    if args.node is not None:
        from plugin.daemon.mig_wiring import sim_locations

        return str(sim_locations(args.node)[1])
    return args.control_socket or DEFAULT_CONTROL_SOCKET


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Add `reconfigure` and `status` to the `gpushare mig` sub-commands."""
    reconfigure = sub.add_parser(
        "reconfigure",
        help="ask the running daemon to repartition the GPUs (a reconfiguration job)",
        description=RECONFIGURE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reconfigure.add_argument("-c", "--config", required=True, metavar="NAME",
                             help="name of the mig-parted config to apply")
    reconfigure.add_argument("-f", "--file", type=Path, metavar="FILE",
                             help="mig-parted file (default: the daemon's configFile)")
    reconfigure.add_argument("--wait", action="store_true",
                             help="print the job's progress and wait until it ends")
    _socket_arg(reconfigure)
    reconfigure.set_defaults(func=reconfigure_command)

    status = sub.add_parser(
        "status",
        help="show the daemon's MIG jobs: the running one, the schedule, the history",
        description="Show the running daemon's MIG reconfiguration jobs: the job in progress,"
        " the scheduled entries with their next run, and the last jobs with their start,"
        " duration, result, per-GPU outcome and reason (newest first).",
    )
    status.add_argument("--format", choices=["table", "json"], default="table",
                        help="table (default) or json (every field, per-GPU outcomes included)")
    _socket_arg(status)
    status.add_argument(
        "--state-dir", metavar="DIR", type=Path,
        help="read the job history a daemon left in its state directory (e.g."
        f" {DEFAULT_STATE_DIR}) instead of asking it: for a daemon that is not running",
    )
    status.set_defaults(func=status_command)


def _error(command: str, message: str, code: int) -> int:
    print(f"gpushare mig {command}: {message}", file=sys.stderr)
    return code


def reconfigure_command(args: argparse.Namespace) -> int:
    """Send a reconfigure request; with --wait, follow the job to its end."""
    request: dict[str, Any] = {"op": "reconfigure", "config": args.config, "wait": args.wait}
    if args.file is not None:
        try:
            request["file_text"] = read_mig_file(args.file)
        except SharingError as err:
            return _error("reconfigure", str(err), EXIT_REFUSED)
        request["file_name"] = str(args.file.resolve())

    def progress(event: dict[str, Any]) -> None:
        print(f"  {event.get('message', '')}", flush=True)

    try:
        answer = call(_socket_path(args), request, on_event=progress,
                      timeout_s=None if args.wait else 30.0)
    except ControlError as err:
        return _error("reconfigure", str(err), EXIT_FAILED)
    if not answer.get("ok"):
        return _error("reconfigure", str(answer.get("error", "refused")), EXIT_REFUSED)
    job = answer["job"]
    if job["result"] == "running":
        print(f"job {job['id']} started: {job['config']} ({job['phase']}); "
              "follow it with `gpushare mig status`")
        return 0
    print(f"job {job['id']} {job['result']}: {job['reason']}")
    for gpu in job.get("gpus", []):
        detail = f" ({gpu['detail']})" if gpu.get("detail") else ""
        print(f"  GPU {gpu['index']}: {gpu['outcome']}{detail}")
    return 0 if job["result"] == "success" else EXIT_FAILED


def status_command(args: argparse.Namespace) -> int:
    """Ask for the job history and print it (or read it from --state-dir)."""
    if args.state_dir is not None:
        if args.node is not None or args.control_socket is not None:
            return _error("status", "--state-dir reads the history without a daemon: it does"
                          " not go with --node or --control-socket", EXIT_REFUSED)
        return _offline_status(args.state_dir, args.format)
    try:
        answer = call(_socket_path(args), {"op": "status"})
    except ControlError as err:
        return _error("status", f"{err} (is `gpushare run` running? `--state-dir DIR` shows"
                      " the history it left)", EXIT_FAILED)
    if not answer.get("ok"):
        return _error("status", str(answer.get("error")), EXIT_FAILED)
    answer.pop("ok")
    if args.format == "json":
        print(json.dumps(answer, indent=2))
    else:
        print(format_status(answer))
    return 0


def _offline_status(state_dir: Path, output: str) -> int:
    """The history a daemon left in `state_dir`, printed like a daemon's answer."""
    try:
        jobs = read_history(state_dir)
    except ValueError as err:
        return _error("status", str(err), EXIT_FAILED)
    status = {"jobs": [j.to_json() for j in jobs], "state_dir": str(state_dir)}
    if output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(f"job history from {state_dir} (read from disk: no daemon was asked; a job shown"
              " running was interrupted and the next start finishes it)")
        print(format_jobs(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The status answer as text: settings, schedule, running job, history (newest first)."""
    kill = "yes" if status.get("kill_processes") else "no"
    lines = [
        f"config file: {status.get('config_file') or '(none; requests must pass -f FILE)'}",
        f"drain timeout: {status.get('drain_timeout_s', 0):g} s, kill processes: {kill}",
    ]
    schedule = status.get("schedule") or []
    lines.append("schedule:" + ("" if schedule else " (none)"))
    lines += [f"  {e['cron']:<20} -> {e['config']:<20} next {e['next_run'] or 'never'}"
              for e in schedule]
    return "\n".join([*lines, format_jobs(status)])


def format_jobs(status: dict[str, Any]) -> str:
    """The running job and the history as a table, newest first."""
    lines: list[str] = []
    jobs = list(reversed(status.get("jobs") or []))
    current = status.get("current")
    if current and all(j["id"] != current["id"] for j in jobs):
        jobs.insert(0, current)
    if not jobs:
        lines.append("no jobs yet")
        return "\n".join(lines)
    rows = [("JOB", "CONFIG", "SOURCE", "STARTED", "TOOK", "RESULT", "GPUS", "REASON")]
    rows += [_row(j) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines.append("")
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row(job: dict[str, Any]) -> tuple[str, ...]:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(job["started_at"]))
    took = f"{job['ended_at'] - job['started_at']:.1f} s" if job.get("ended_at") else "-"
    result = job["result"] if job["result"] != "running" else f"running ({job['phase']})"
    reason = job.get("reason", "")
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 1] + "…"
    return (str(job["id"]), job["config"], job["source"], started, took, result,
            gpu_summary(job.get("gpus", [])), reason)


def gpu_summary(gpus: Sequence[dict[str, Any]]) -> str:
    """`0-3 reconfigured, 4-7 unchanged`: GPU indices grouped by outcome."""
    by_outcome: dict[str, list[int]] = {}
    for gpu in gpus:
        by_outcome.setdefault(gpu["outcome"], []).append(int(gpu["index"]))
    parts = [f"{index_ranges(ix, sep=',')} {outcome}" for outcome, ix in by_outcome.items()]
    return ", ".join(parts) or "-"


__all__ = ["add_client_commands", "format_status", "gpu_summary"]
