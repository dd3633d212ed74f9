"""The process seam of mps_daemon: run a command to completion, or spawn a long-lived one.

argv lists only, never a shell. `SubprocessRunner` is the real implementation; another runner
(for instance one that records argv) can be passed where a test needs to see the commands.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of one finished command."""

    returncode: int
    stdout: str
    stderr: str


class Process(Protocol):
    """A spawned child (subprocess.Popen's shape)."""

    pid: int

    def poll(self) -> int | None:
        """Exit status, or None while it runs."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; raises subprocess.TimeoutExpired after `timeout` seconds."""

    def terminate(self) -> None:
        """Send SIGTERM."""

    def kill(self) -> None:
        """Send SIGKILL."""


class CommandRunner(Protocol):
    """How mps_daemon starts processes."""

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str | None, timeout_s: float
    ) -> CommandResult:
        """Run to completion; raises OSError when argv[0] cannot be executed."""

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], output: Path) -> Process:
        """Start a child in its own session, stdout and stderr appended to `output`."""


class SubprocessRunner:
    """CommandRunner over the subprocess module."""

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str | None, timeout_s: float
    ) -> CommandResult:
        """Run to completion; a timeout is returned as exit status 124."""
        try:
            done = subprocess.run(  # noqa: S603 - argv list, no shell
                list(argv), input=stdin or "", env=dict(env), capture_output=True, text=True,
                timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired as err:
            return CommandResult(124, _text(err.stdout), f"timed out after {timeout_s}s")
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], output: Path) -> Process:
        """Start a child in its own session (signals to our terminal do not reach it)."""
        with open(output, "ab") as out:
            return subprocess.Popen(  # noqa: S603 - argv list, no shell
                list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""
