"""One error hierarchy for the domain."""

from __future__ import annotations


class SharingError(Exception):
    """Base of every error gpushare raises on purpose."""


class ConfigError(SharingError):
    """A config file or flag is invalid; the message names file, field, value and what is valid."""


class PlanError(SharingError):
    """The config cannot be applied to this node's inventory."""


class InvalidRequest(SharingError):
    """A kubelet request (Allocate, GetPreferredAllocation) cannot be satisfied."""


class NvmlError(SharingError):
    """An NVML call failed; `code` holds the NVML return code when known."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NvmlNotSupported(NvmlError):
    """The driver or device does not support the call."""


class NvmlUnavailable(NvmlError):
    """NVML cannot be loaded or initialised (no driver, no library)."""


class GpuLost(NvmlError):
    """The GPU fell off the bus or stopped answering."""


class MigError(SharingError):
    """A MIG operation was refused (placement, overlap, in use)."""


class MigConfigError(ConfigError):
    """A mig-parted file is invalid, or names a config it does not have."""


class MigPlanError(PlanError):
    """A MIG layout cannot be applied to this node; the message names each GPU and the reason."""


class MigJournalError(SharingError):
    """The MIG apply journal is unreadable, corrupt, or was written on another node."""


class MigApplyRefused(MigError):
    """A MIG apply was refused before touching anything (processes running, another apply)."""
