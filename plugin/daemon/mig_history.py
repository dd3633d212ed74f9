"""MIG reconfiguration job records, their bounded history and the active-job file, on disk.

Under `--state-dir`: `mig-jobs.json` keeps the last MAX_HISTORY jobs (start, end, result, per-GPU
outcome, reason), and `mig-job-active.json` exists while a job runs: its config, the mig-parted
text it planned from and the phase it reached, so a daemon started after a crash knows what to
finish. Both are written atomically (temporary file in the same directory, fsync, rename). A
history file that cannot be read is moved aside (`.corrupt`) and a new one started, never lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sharing.nvml.files import open_regular, write_atomic

log = logging.getLogger("gpushare.mig.jobs")

DEFAULT_STATE_DIR = "/var/lib/gpushare"
HISTORY_FILE = "mig-jobs.json"
ACTIVE_FILE = "mig-job-active.json"
JOURNAL_FILE = "mig-journal.json"
MAX_HISTORY = 50
MAX_STATE_FILE_BYTES = 8 * 1024 * 1024
MAX_REASON_CHARS = 2000
FORMAT_VERSION = 1

Result = Literal["running", "success", "failed"]
Outcome = Literal["reconfigured", "unchanged", "failed", "untouched"]


@dataclass(frozen=True)
class GpuOutcome:
    """What a job did to one GPU it selected."""

    index: int
    uuid: str
    outcome: str  # an Outcome
    detail: str = ""


@dataclass(frozen=True)
class JobRecord:
    """One reconfiguration job as `gpushare mig status` shows it. Times are Unix seconds."""

    id: int
    config: str
    source: str  # "request", "schedule" or "restart" (rolled forward at daemon start)
    file: str  # the mig-parted file it read (a path, or the client's file name)
    started_at: float
    ended_at: float | None = None
    result: str = "running"  # a Result
    phase: str = "planning"
    reason: str = ""
    gpus: tuple[GpuOutcome, ...] = ()
    refused: bool = False  # refused at planning (unknown config, infeasible): nothing started

    @property
    def done(self) -> bool:
        """Whether the job has ended (success or failed)."""
        return self.result != "running"

    def finished(self, result: Result, reason: str, gpus: tuple[GpuOutcome, ...] = ()) -> JobRecord:
        """This record, ended now with `result`."""
        return replace(
            self, result=result, reason=reason[:MAX_REASON_CHARS], ended_at=time.time(),
            phase="done", gpus=gpus or self.gpus,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        """The record `to_json` wrote.

        Raises:
            ValueError: the data is not a job record.
        """
        try:
            gpus = tuple(GpuOutcome(**g) for g in data.get("gpus", ()))
            return cls(**{**data, "gpus": gpus})
        except TypeError as err:
            raise ValueError(f"not a job record: {err}") from None


@dataclass(frozen=True)
class ActiveJob:
    """The job in progress, as much as a restarted daemon needs to finish it."""

    record: JobRecord
    text: str  # the mig-parted file's text the job planned from
    node: tuple[str, ...] = field(default_factory=tuple)  # GPU UUIDs by index when it started

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"version": FORMAT_VERSION, "record": self.record.to_json(), "text": self.text,
                "node": list(self.node)}


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to `path` in one rename, flushed to disk (mode 0600)."""
    write_atomic(path, json.dumps(data, separators=(",", ":")), durable=True)


def _read_json(path: Path) -> Any:
    """Parsed JSON of a state file; ValueError when too big or not JSON, OSError when unreadable."""
    with open_regular(path) as f:
        raw = f.read(MAX_STATE_FILE_BYTES + 1)
    if len(raw) > MAX_STATE_FILE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from None
    except RecursionError:
        raise ValueError("not JSON (nested too deeply)") from None


def _check_private(directory: Path) -> None:
    """The state directory must be changeable by its owner (us or root) only: whoever can
    write it can plant a journal that the next start acts on, reconfiguring the GPUs.

    Raises:
        OSError: owned by another user, or writable by group or others.
    """
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (0, os.geteuid()):
        raise OSError(errno.EACCES, f"owned by uid {info.st_uid}, not by root or us")
    if mode & 0o022:
        raise OSError(errno.EACCES, f"writable by group or others (mode {mode:04o}); "
                                    "the MIG journal there could be planted")


def _read_history(path: Path) -> tuple[list[JobRecord], int]:
    """The jobs (oldest first) and next job id of a history file.

    Raises:
        FileNotFoundError: there is none.
        OSError: it cannot be read.
        ValueError, KeyError, TypeError: it is not a job history.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a version {FORMAT_VERSION} job history")
    return [JobRecord.from_json(j) for j in data["jobs"]], int(data["next_id"])


def read_history(state_dir: Path) -> tuple[JobRecord, ...]:
    """The jobs a daemon recorded in `state_dir`, oldest first, read without changing anything
    (for `gpushare mig status --state-dir` while no daemon runs).

    Raises:
        ValueError: no history there, or it cannot be read (the message names the file).
    """
    path = Path(state_dir) / HISTORY_FILE
    try:
        return tuple(_read_history(path)[0])
    except FileNotFoundError:
        raise ValueError(f"{path}: no MIG job history (no job has run with this state "
                         "directory)") from None
    except OSError as err:
        raise ValueError(f"{path}: unreadable ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


class JobStore:
    """The job history and the active-job file of one state directory; thread-safe."""

    def __init__(self, state_dir: Path, keep: int = MAX_HISTORY) -> None:
        self.state_dir = Path(state_dir)
        self.keep = keep
        self._lock = threading.Lock()
        self._jobs: list[JobRecord] = []
        self._next_id = 1

    @property
    def history_path(self) -> Path:
        """`<state-dir>/mig-jobs.json`."""
        return self.state_dir / HISTORY_FILE

    @property
    def active_path(self) -> Path:
        """`<state-dir>/mig-job-active.json`."""
        return self.state_dir / ACTIVE_FILE

    @property
    def journal_path(self) -> Path:
        """`<state-dir>/mig-journal.json`, the apply engine's journal of the daemon's jobs."""
        return self.state_dir / JOURNAL_FILE

    def open(self) -> None:
        """Create the state directory (0700) if needed and read the history.

        Raises:
            OSError: the directory cannot be created.
        """
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(self.state_dir)
        try:
            jobs, next_id = _read_history(self.history_path)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            aside = self.history_path.with_name(HISTORY_FILE + ".corrupt")
            log.error("MIG job history %s unreadable (%s); moved to %s, starting a new one",
                      self.history_path, err, aside.name)
            with contextlib.suppress(OSError):
                os.replace(self.history_path, aside)
            return
        with self._lock:
            self._jobs = jobs[-self.keep:]
            self._next_id = max([next_id, *(j.id + 1 for j in jobs)])

    def new_id(self) -> int:
        """The next job id."""
        with self._lock:
            job_id = self._next_id
            self._next_id += 1
            return job_id

    def jobs(self) -> tuple[JobRecord, ...]:
        """The kept jobs, oldest first."""
        with self._lock:
            return tuple(self._jobs)

    def last(self) -> JobRecord | None:
        """The most recent job, or None."""
        with self._lock:
            return self._jobs[-1] if self._jobs else None

    def save(self, record: JobRecord) -> None:
        """Add or replace a job record and write the history (keeping the last `keep`)."""
        with self._lock:
            # a job a previous daemon started (its id never reached the file) is not reused
            self._next_id = max(self._next_id, record.id + 1)
            self._jobs = [j for j in self._jobs if j.id != record.id] + [record]
            self._jobs.sort(key=lambda j: j.id)
            self._jobs = self._jobs[-self.keep:]
            data = {"version": FORMAT_VERSION, "next_id": self._next_id,
                    "jobs": [j.to_json() for j in self._jobs]}
            try:
                write_json_atomic(self.history_path, data)
            except OSError as err:
                log.error("writing the MIG job history %s failed: %s", self.history_path, err)

    def set_active(self, active: ActiveJob | None) -> None:
        """Write the active-job file, or remove it (None).

        Raises:
            OSError: it cannot be written (a job must not start without it).
        """
        if active is None:
            with contextlib.suppress(FileNotFoundError):
                self.active_path.unlink()
            return
        write_json_atomic(self.active_path, active.to_json())

    def active(self) -> ActiveJob | None:
        """The job a previous daemon left unfinished, or None.

        Raises:
            ValueError: the file exists but is not an active-job file (the message says why).
        """
        try:
            data = _read_json(self.active_path)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ValueError(f"{self.active_path}: unreadable ({err.strerror or err})") from None
        except ValueError as err:
            raise ValueError(f"{self.active_path}: {err}") from None
        try:
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version {FORMAT_VERSION} active-job file")
            return ActiveJob(JobRecord.from_json(data["record"]), str(data["text"]),
                             tuple(str(u) for u in data.get("node", ())))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.active_path}: {err}") from None


__all__ = [
    "ACTIVE_FILE",
    "DEFAULT_STATE_DIR",
    "HISTORY_FILE",
    "JOURNAL_FILE",
    "MAX_HISTORY",
    "ActiveJob",
    "GpuOutcome",
    "JobRecord",
    "JobStore",
    "write_json_atomic",
]
