"""Supervision of `nvidia-cuda-mps-control`: one control daemon per MPS resource of the Plan.

Dependency direction: plugin -> mps_daemon -> sharing; nothing here imports plugin.
"""

from mps_daemon.control import (
    COMPUTE_MODE_POLICIES,
    LEAVE_COMPUTE_MODE,
    MANAGE_COMPUTE_MODE,
    MpsControlDaemon,
    MpsDaemonError,
    checked_dirs,
)
from mps_daemon.runner import CommandResult, CommandRunner, SubprocessRunner
from mps_daemon.standin_path import STANDIN, standin_argv
from mps_daemon.supervisor import MpsSupervisor

__all__ = [
    "COMPUTE_MODE_POLICIES",
    "LEAVE_COMPUTE_MODE",
    "MANAGE_COMPUTE_MODE",
    "STANDIN",
    "CommandResult",
    "CommandRunner",
    "MpsControlDaemon",
    "MpsDaemonError",
    "MpsSupervisor",
    "SubprocessRunner",
    "checked_dirs",
    "standin_argv",
]
