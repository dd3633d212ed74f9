"""The node labels file: facts §8 labels for node-feature-discovery's local source.

One `key=value` per line, written atomically (a temporary file in the same directory, then a
rename), so NFD, which may read at any moment, sees the old file or the new one, never half of
one. It is rewritten whenever the plan or the MIG job state changes, and removed on a clean
stop. The path comes from `--labels-file`, `GFD_OUTPUT_FILE` or `flags.gfd.outputFile` (flag >
env > file > default); an empty path disables it.

For code outside this module (the MIG reconfiguration jobs, say), through the daemon:

    daemon.set_mig_state("all-1g.5gb", "pending")   # nvidia.com/mig.config{,.state}
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from sharing.nvml.files import write_atomic

log = logging.getLogger("gpushare.labels")

FILE_MODE = 0o644  # NFD's worker reads it, maybe as another user
MIG_STATES = ("pending", "rebooting", "success", "failed")
MIG_CONFIG_LABEL = "nvidia.com/mig.config"
MIG_STATE_LABEL = "nvidia.com/mig.config.state"
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")

Labels = tuple[tuple[str, str], ...]


def render(labels: Iterable[tuple[str, str]]) -> str:
    """NFD local-source text: one `key=value` per line, sorted by key."""
    return "".join(f"{key}={value}\n" for key, value in sorted(labels))


class LabelsFile:
    """Keeps the labels file in step with the plan's labels and the MIG job state."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._plan_labels: Labels = ()
        self._mig: Labels = ()
        self._written: tuple[Path, str] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        """Where the labels go now (None: disabled)."""
        return self._path

    def update(self, labels: Labels, path: Path | None) -> None:
        """Write the plan's labels (to a new path, the old file removed, if the path changed)."""
        with self._lock:
            if path != self._path:
                self._remove_locked()
                self._path = path
            self._plan_labels = labels
            self._write_locked()

    def set_mig_state(self, config: str, state: str) -> None:
        """Set `nvidia.com/mig.config` and `nvidia.com/mig.config.state` and rewrite the file.

        Raises:
            ValueError: `state` is not pending/rebooting/success/failed, or `config` is not a
                valid label value (<= 63 alphanumerics, '-', '_', '.').
        """
        if state not in MIG_STATES:
            raise ValueError(f"MIG state {state!r}: expected one of {MIG_STATES}")
        if not _LABEL_VALUE.fullmatch(config):
            raise ValueError(f"MIG config name {config[:80]!r} is not a valid label value")
        with self._lock:
            self._mig = ((MIG_CONFIG_LABEL, config), (MIG_STATE_LABEL, state))
            self._write_locked()

    def remove(self) -> None:
        """Remove the file (a clean stop); safe to call twice."""
        with self._lock:
            self._remove_locked()

    def _write_locked(self) -> None:
        if self._path is None:
            return
        merged = dict(self._plan_labels)
        merged.update(self._mig)
        text = render(merged.items())
        if self._written == (self._path, text):
            return
        try:
            write_atomically(self._path, text)
        except OSError as err:
            log.error("cannot write the node labels to %s: %s", self._path, err.strerror or err)
            return
        first = self._written is None
        self._written = (self._path, text)
        log.info("node labels %s %s (%d labels)", "written to" if first else "updated in",
                 self._path, len(merged))

    def _remove_locked(self) -> None:
        if self._written is None:
            return
        path, _ = self._written
        self._written = None
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot remove the node labels file %s: %s", path, err.strerror or err)
            return
        log.info("node labels file %s removed", path)


def write_atomically(path: Path, text: str) -> None:
    """Replace the labels file in one rename (mode 0644: NFD's worker may read it as another
    user), flushed to disk so a crash never leaves a half-written file for NFD to read.

    Raises:
        OSError: the directory cannot be created or written.
    """
    write_atomic(path, text, mode=FILE_MODE, durable=True)
