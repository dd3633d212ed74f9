"""The MIG planner and apply engine as the job runner calls them, and reading mig-parted files.

A thin seam over `sharing.mig` (pure planning) and the NVML edge's apply engine
(`sharing.nvml.mig_apply`), so the runner names one object for planning, applying and rolling
an interrupted apply forward; every call goes to the real engine. A mig-parted file (up to
1 MiB, sent with a request or read for a scheduled job) is parsed and validated in the config
reader's child process (plugin.daemon.config_reader: its own GIL, lower priority, bounded time
and memory), so parsing it never holds up Allocate; the daemon's thread only plans the parsed
config against the node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from plugin.daemon.config_reader import ConfigReader, ReadCancelled
from sharing.errors import ConfigError, MigConfigError
from sharing.mig import MigPartedFile, MigPlan
from sharing.nvml import Nvml
from sharing.nvml.files import UnreadableFile, read_regular_text
from sharing.nvml.mig_apply import ApplyResult, StepEvent, apply_mig, plan_mig, resume_mig
from sharing.nvml.mig_journal import read_journal

MAX_MIG_FILE_BYTES = 1024 * 1024

OnStep = Callable[[StepEvent], None]


def read_mig_file(path: Path) -> str:
    """The text of a mig-parted file, bounded.

    Raises:
        ConfigError: it cannot be read, is not a regular file or text, or is larger than
            MAX_MIG_FILE_BYTES; one line naming the path.
    """
    try:
        return read_regular_text(path, MAX_MIG_FILE_BYTES, "mig-parted file")
    except UnreadableFile as err:
        raise ConfigError(f"{path}: {err}") from None


class MigEngine:
    """Plans mig-parted configs against the node and applies plans through the journal."""

    def __init__(self, reader: ConfigReader | None = None) -> None:
        self._reader = reader or ConfigReader()  # its child starts with the first plan

    def plan(self, nvml: Nvml, text: str, source: str, config: str) -> MigPlan:
        """The MigPlan of `config` from a mig-parted file's text (`source` names it); the text
        is parsed in the reader's child, the plan made here.

        Raises:
            SharingError: the file is invalid, the config unknown, the layout infeasible, or
                the file could not be read in time or memory (or the engine is closed).
        """
        try:
            parsed = self._reader.read_mig(text, source=source, config=config)
        except ReadCancelled as err:
            raise MigConfigError(f"{source}: not read: {err}") from None
        except OSError as err:
            raise MigConfigError(f"{source}: cannot start the config reader: {err}") from None
        return plan_mig(nvml, MigPartedFile(source, (parsed,)), config)

    def close(self) -> None:
        """Stop the reader's child; later plans are refused."""
        self._reader.close()

    def check_journal(self, journal_path: Path, node: tuple[str, ...]) -> None:
        """Refuse a journal that apply would refuse (corrupt, another node's), up front.

        Raises:
            MigJournalError: the journal is unreadable, corrupt, or from another node.
        """
        read_journal(journal_path, node)

    def apply(
        self, nvml: Nvml, plan: MigPlan, *, journal_path: Path, on_step: OnStep | None = None
    ) -> ApplyResult:
        """Apply a MigPlan, journalled at `journal_path`; per-GPU failures are in the result.

        Raises:
            SharingError: refused before touching anything (processes, lost GPU, a corrupt
                journal or one from another node).
        """
        return apply_mig(nvml, plan, journal_path=journal_path, on_step=on_step)

    def resume(
        self, nvml: Nvml, *, journal_path: Path, on_step: OnStep | None = None
    ) -> ApplyResult | None:
        """Finish the apply the journal records as interrupted; None when there is none.

        Raises:
            SharingError: the journal is corrupt or from another node, or the node refuses.
        """
        return resume_mig(nvml, journal_path=journal_path, on_step=on_step)


__all__ = ["MAX_MIG_FILE_BYTES", "MigEngine", "OnStep", "read_mig_file"]
