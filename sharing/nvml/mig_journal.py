"""The MIG apply journal: one JSON state file, rewritten atomically at every step.

An apply writes the journal before it touches a GPU (`begin`: node identity, config, what each
selected GPU should have), then around every NVML mutation (`started`, then `done` or `failed`),
then its outcome (`finish`). Each write goes to a temporary file in the same directory that is
renamed over the journal, so a reader sees the old or the new journal, never a torn one, even
when the writer is killed. The first and last writes are also flushed to disk.

A journal whose status is still `running` records an interrupted apply: applying again (or
`resume_mig` at daemon start) reads the GPUs afresh and converges them to the journalled requests,
destroying any GPU instance the interrupted run left without its compute instance. A journal
written on another node (different GPU UUIDs) or that is not a journal is refused, before any
GPU is touched.

Format (version 1):
    {"kind": "gpushare-mig-journal", "version": 1, "node": [GPU UUIDs by index],
     "config": name, "source": file, "status": "running" | "succeeded" | "failed",
     "started": ISO time, "updated": ISO time,
     "requests": {"<gpu>": {"mig_enabled": bool, "counts": [[profile, count], ...]}},
     "steps": [{"step": {Step fields}, "state": "started" | "done" | "failed", "error": str}],
     "outcomes": [{"gpu": i, "result": ..., "reason": ...}]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sharing.errors import MigApplyRefused, MigJournalError
from sharing.mig.diff import Step
from sharing.mig.layout import LayoutRequest
from sharing.nvml.files import open_regular, write_atomic

KIND = "gpushare-mig-journal"
VERSION = 1
MAX_JOURNAL_BYTES = 4 * 1024 * 1024
RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
STATUSES = (RUNNING, SUCCEEDED, FAILED)


@dataclass(frozen=True)
class JournalRecord:
    """A journal as read back."""

    path: Path
    node: tuple[str, ...]
    config: str
    source: str
    status: str
    started: str
    updated: str
    requests: dict[int, LayoutRequest]
    steps: tuple[tuple[Step, str, str], ...]  # (step, state, error)
    outcomes: tuple[dict[str, Any], ...] = ()

    @property
    def interrupted(self) -> bool:
        """The apply that wrote it never finished (killed, crashed, power lost)."""
        return self.status == RUNNING

    @property
    def last_step(self) -> str:
        """The last journalled step in words, with its state ('' when none)."""
        if not self.steps:
            return ""
        step, state, _ = self.steps[-1]
        return f"{step.describe()} ({state})"


def read_journal(path: Path, node: tuple[str, ...] | None = None) -> JournalRecord | None:
    """The journal at `path`, or None when there is none.

    Raises:
        MigJournalError: unreadable, not a journal, corrupt, or (when `node` is given) written on
            a node with other GPUs; one line naming the file and the cause.
    """
    path = Path(path)
    try:
        with open_regular(path) as handle:
            data = handle.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise MigJournalError(f"{path}: cannot read the MIG journal: {err.strerror}") from err
    if len(data) > MAX_JOURNAL_BYTES:
        raise MigJournalError(f"{path}: corrupt MIG journal: larger than 4 MiB")
    try:
        record = _parse(path, json.loads(data))
    except RecursionError:
        raise MigJournalError(
            f"{path}: corrupt MIG journal (nested too deeply); remove it to go on"
        ) from None
    except KeyError as err:
        raise MigJournalError(
            f"{path}: corrupt MIG journal (missing {err}); remove it to go on"
        ) from None
    except (ValueError, TypeError, AttributeError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise MigJournalError(
            f"{path}: corrupt MIG journal ({reason}); remove it to go on"
        ) from None
    if node is not None and record.node != tuple(node):
        raise MigJournalError(
            f"{path}: MIG journal written on another node (its GPUs {_uuids(record.node)}, this "
            f"node's {_uuids(tuple(node))}); refusing it: remove it if the GPUs were replaced"
        )
    return record


def _uuids(node: tuple[str, ...]) -> str:
    if not node:
        return "none"
    return f"{node[0]}…" + (f" and {len(node) - 1} more" if len(node) > 1 else "")


def _parse(path: Path, raw: Any) -> JournalRecord:
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise ValueError("not a gpushare MIG journal")
    if raw.get("version") != VERSION:
        raise ValueError(f"unknown journal version {raw.get('version')!r}")
    if raw["status"] not in STATUSES:
        raise ValueError(f"unknown status {raw['status']!r}")
    requests = {}
    for key, value in raw["requests"].items():
        counts = tuple((str(name), int(n)) for name, n in value["counts"])
        requests[int(key)] = LayoutRequest(bool(value["mig_enabled"]), counts)
    steps = tuple(
        (Step.from_json(dict(item["step"])), str(item["state"]), str(item.get("error", "")))
        for item in raw["steps"]
    )
    node = raw["node"]
    if not isinstance(node, list) or not all(isinstance(u, str) for u in node):
        raise ValueError("node must be a list of GPU UUIDs")
    return JournalRecord(
        path, tuple(node), str(raw["config"]), str(raw["source"]), raw["status"],
        str(raw["started"]), str(raw["updated"]), requests, steps,
        tuple(dict(o) for o in raw.get("outcomes", ())),
    )  # fmt: skip


@contextlib.contextmanager
def journal_lock(path: Path) -> Iterator[None]:
    """Hold `<journal>.lock` exclusively: one apply per journal (daemon job or command) at a time.

    Raises:
        MigApplyRefused: another apply holds the lock.
        MigJournalError: the lock file cannot be opened.
    """
    lock = Path(path).with_name(Path(path).name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise MigJournalError(f"{lock}: cannot open the MIG journal lock: {err.strerror}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MigApplyRefused(
                f"{path}: another MIG apply is running on this node (it holds {lock.name})"
            ) from None
        yield
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Journal:
    """Writes one apply's journal; every method rewrites the file atomically."""

    def __init__(
        self,
        path: Path,
        *,
        node: tuple[str, ...],
        config: str,
        source: str,
        requests: dict[int, LayoutRequest],
    ) -> None:
        self.path = Path(path)
        started = _now()
        self._data: dict[str, Any] = {
            "kind": KIND, "version": VERSION, "node": list(node), "config": config,
            "source": source, "status": RUNNING, "started": started, "updated": started,
            "requests": {
                str(i): {"mig_enabled": r.mig_enabled, "counts": [list(c) for c in r.counts]}
                for i, r in sorted(requests.items())
            },
            "steps": [], "outcomes": [],
        }  # fmt: skip

    def begin(self) -> None:
        """Record the apply before any GPU is touched (flushed to disk).

        Raises:
            MigJournalError: the journal cannot be written.
        """
        self._write(durable=True)

    def started(self, step: Step) -> None:
        """Record that a step is about to run."""
        self._data["steps"].append({"step": step.to_json(), "state": "started"})
        self._write()

    def done(self, step: Step) -> None:
        """Record that the last started step completed."""
        self._data["steps"][-1]["state"] = "done"
        self._write()

    def failed(self, step: Step, error: str) -> None:
        """Record that the last started step failed, and why."""
        self._data["steps"][-1].update(state="failed", error=error)
        self._write()

    def finish(self, status: str, outcomes: list[dict[str, Any]]) -> None:
        """Record the outcome (flushed to disk)."""
        self._data["status"] = status
        self._data["outcomes"] = outcomes
        self._write(durable=True)

    def _write(self, durable: bool = False) -> None:
        self._data["updated"] = _now()
        data = json.dumps(self._data, separators=(",", ":")).encode()
        try:
            write_atomic(self.path, data, durable=durable)
        except OSError as err:
            raise MigJournalError(
                f"{self.path}: cannot write the MIG journal: {err.strerror or err}"
            ) from err
