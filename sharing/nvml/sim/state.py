"""The simulated node's state directory: an immutable node description plus mutable JSON state.

Layout of a state directory:
  node.yaml      the node description it was created from (never changed)
  state.json     mutable state (MIG mode and instances, compute mode, lost GPUs, processes, events)
  lock           fcntl lock file; every writer holds it exclusively for read-modify-write
  host/          files the host would have: sys/bus/pci/devices/<bus>/numa_node and
                 proc/driver/nvidia-caps/mig-minors, read by the same readers as on a real node

Writers replace state.json atomically and give every version a strictly increasing mtime, so a
reader keyed on (mtime_ns, size) never serves a stale parse and never needs the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharing.errors import SharingError
from sharing.nvml.files import write_atomic

NODE_FILE = "node.yaml"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
HOST_DIR = "host"
MAX_EVENTS = 1000
NO_ID = 0xFFFFFFFF  # NVML's "whole GPU" GI/CI id in events and process info

State = dict[str, Any]


class SimError(SharingError):
    """A simulator control request is invalid (unknown GPU, bad GI:CI, not a state directory)."""


def is_state_dir(path: Path) -> bool:
    """Whether `path` is a state directory made by `create_state`."""
    return (path / NODE_FILE).is_file() and (path / STATE_FILE).is_file()


class StateStore:
    """Reads (cached) and mutates (locked, atomic) one state directory's state.json."""

    def __init__(self, path: Path) -> None:
        if not is_state_dir(path):
            raise SimError(f"{path}: not a simulated node state directory (no {STATE_FILE})")
        self.path = path
        self._file = path / STATE_FILE
        # (file key, parsed state) replaced as one value, so concurrent readers never pair a
        # newer key with an older state.
        self._cache: tuple[tuple[int, int] | None, State] = (None, {})

    def read(self) -> State:
        """The current state; parsed again only when the file changed. Do not mutate it."""
        st = os.stat(self._file)
        key = (st.st_mtime_ns, st.st_size)
        cached_key, state = self._cache
        if key != cached_key:
            state = json.loads(self._file.read_bytes())
            self._cache = (key, state)
        return state

    def version(self) -> tuple[int, int]:
        """A key that changes whenever the state file is replaced."""
        st = os.stat(self._file)
        return (st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def mutate(self) -> Iterator[State]:
        """Yield a private copy of the state under the lock; write it back if no exception."""
        with _locked(self.path / LOCK_FILE):
            old = os.stat(self._file)
            state = json.loads(self._file.read_bytes())
            yield state
            state["events"] = state["events"][-MAX_EVENTS:]
            data = json.dumps(state, sort_keys=True).encode()
            mtime_ns = max(time.time_ns(), old.st_mtime_ns + 1)
            write_atomic(self._file, data, mode=0o644, mtime_ns=mtime_ns)
            self._cache = ((mtime_ns, len(data)), json.loads(data))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_event(
    state: State, gpu: int, event_type: int, data: int, gi: int | None, ci: int | None
) -> int:
    """Append one NVML event to the state; returns its sequence number."""
    seq = state["next_seq"]
    state["next_seq"] = seq + 1
    state["events"].append({
        "seq": seq, "gpu": gpu, "type": event_type, "data": data,
        "gi": NO_ID if gi is None else gi, "ci": NO_ID if ci is None else ci,
    })  # fmt: skip
    return seq
