"""XID policy: which NVML events mark a device Unhealthy, and which need a GPU reset. Pure.

Defaults follow the upstream device plugin (facts §5): XIDs 13, 31, 43, 45, 68 and 109 are
application errors and are ignored; DP_DISABLE_HEALTHCHECKS and DP_ENABLE_HEALTHCHECKS adjust that
(the plugin reads the environment and passes the strings in). The `health:` config section
(gpushare extension) sets the ignored and reset-class XIDs, the recovery quiet period and the
probe interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from sharing.errors import ConfigError
from sharing.text import shorten

DEFAULT_IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})
DEFAULT_RESET_REQUIRED_XIDS = frozenset({48, 79, 95})
DEFAULT_QUIET_PERIOD_S = 300.0
DEFAULT_PROBE_INTERVAL_S = 10.0
ENV_DISABLE = "DP_DISABLE_HEALTHCHECKS"
ENV_ENABLE = "DP_ENABLE_HEALTHCHECKS"

# Event types as sharing.nvml.XidEvent names them (nvmlEventTypeXidCriticalError, ...ECC...).
EVENT_XID_CRITICAL = "xid"
EVENT_DOUBLE_BIT_ECC = "ecc_double"
EVENT_SINGLE_BIT_ECC = "ecc_single"
DOUBLE_BIT_ECC_XID = 48  # a double-bit ECC event is judged like XID 48
WHOLE_GPU_SCOPE = 0xFFFFFFFF  # GI/CI ID NVML reports when an event concerns the whole GPU

XID_DESCRIPTIONS: Mapping[int, str] = MappingProxyType(
    {
        13: "graphics engine exception",
        31: "GPU memory page fault",
        43: "GPU stopped processing",
        45: "preemptive cleanup",
        48: "double-bit ECC error",
        63: "ECC page retirement or row remapping event",
        64: "ECC page retirement or row remapping failure",
        68: "video processor exception",
        74: "NVLink error",
        79: "GPU has fallen off the bus",
        92: "high single-bit ECC error rate",
        94: "contained ECC error",
        95: "uncontained ECC error",
        109: "context switch timeout",
        119: "GSP RPC timeout",
        120: "GSP error",
    }
)


def describe_xid(xid: int) -> str:
    """`XID 79 (GPU has fallen off the bus)`, or `XID n` for XIDs without a description."""
    text = XID_DESCRIPTIONS.get(xid)
    return f"XID {xid} ({text})" if text else f"XID {xid}"


class XidEventLike(Protocol):
    """What the health rules read from an NVML event (sharing.nvml.XidEvent has these fields)."""

    gpu_index: int
    gpu_uuid: str
    xid: int
    event_type: str
    gi_id: int | None
    ci_id: int | None


class HealthSection(Protocol):
    """The fields of the config's `health:` section (sharing.config_models.Health)."""

    disabled: bool
    ignored_xids: Iterable[int]
    reset_required_xids: Iterable[int]
    recovery_quiet_period_s: float
    probe_interval_s: float


@dataclass(frozen=True)
class HealthSettings:
    """The `health:` config section (gpushare extension), durations in seconds."""

    disabled: bool = False
    ignored_xids: frozenset[int] = DEFAULT_IGNORED_XIDS
    reset_required_xids: frozenset[int] = DEFAULT_RESET_REQUIRED_XIDS
    recovery_quiet_period_s: float = DEFAULT_QUIET_PERIOD_S
    probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S

    @classmethod
    def of(cls, section: HealthSection) -> HealthSettings:
        """Settings from the parsed `health:` section of a config."""
        return cls(
            disabled=section.disabled,
            ignored_xids=frozenset(section.ignored_xids),
            reset_required_xids=frozenset(section.reset_required_xids),
            recovery_quiet_period_s=section.recovery_quiet_period_s,
            probe_interval_s=section.probe_interval_s,
        )


def _parse_xid_list(variable: str, text: str) -> tuple[bool, frozenset[int]]:
    """Parse `all`/`xids` or a comma list of XIDs; returns (all, xids)."""
    everything = False
    xids: set[int] = set()
    for raw in text.split(","):
        token = raw.strip().lower()
        if not token:
            continue
        if token in ("all", "xids"):
            everything = True
        elif token.isdigit():
            xids.add(int(token))
        else:
            raise ConfigError(
                f"{variable}: invalid value {shorten(raw.strip())!r} in {shorten(text)!r}: "
                "expected 'all', 'xids' or a comma-separated list of XID numbers"
            )
    return everything, frozenset(xids)


@dataclass(frozen=True)
class XidPolicy:
    """Which XIDs mark a device unhealthy, and which of those need a GPU reset to recover."""

    disabled: bool = False  # no XID or probe health checks at all
    ignore_all: bool = False  # every XID is ignored unless explicitly enabled
    ignored: frozenset[int] = DEFAULT_IGNORED_XIDS
    enable_all: bool = False  # no XID is ignored
    enabled: frozenset[int] = frozenset()
    reset_required: frozenset[int] = DEFAULT_RESET_REQUIRED_XIDS

    @classmethod
    def from_lists(
        cls, disabled: str | None, enabled: str | None, settings: HealthSettings | None = None
    ) -> XidPolicy:
        """Policy from DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS values and the config.

        DP_DISABLE_HEALTHCHECKS: `all` turns health checks off, `xids` ignores every XID, a
        comma list adds XIDs to the ignored set. DP_ENABLE_HEALTHCHECKS (`all` or a list) wins
        over both: the XIDs it names are never ignored, even when checks are otherwise off.

        Raises:
            ConfigError: a value is neither `all`, `xids` nor a list of numbers.
        """
        settings = settings or HealthSettings()
        disable_text = (disabled or "").strip()
        dis_all = disable_text.lower() == "all"
        ignore_all, extra = _parse_xid_list(ENV_DISABLE, "" if dis_all else disable_text)
        enable_all, enable = _parse_xid_list(ENV_ENABLE, enabled or "")
        enabling = enable_all or bool(enable)
        switched_off = settings.disabled or dis_all
        return cls(
            disabled=switched_off and not enabling,
            ignore_all=ignore_all or switched_off,
            ignored=settings.ignored_xids | extra,
            enable_all=enable_all,
            enabled=enable,
            reset_required=settings.reset_required_xids,
        )

    def is_ignored(self, xid: int) -> bool:
        """True when this XID must not change any device's health."""
        if self.disabled:
            return True
        if self.enable_all or xid in self.enabled:
            return False
        return self.ignore_all or xid in self.ignored

    def needs_reset(self, xid: int) -> bool:
        """True when a device with this XID recovers only after a GPU reset."""
        return xid in self.reset_required


def event_xid(event: XidEventLike) -> int | None:
    """The XID an event is judged by: its own, 48 for a double-bit ECC event, None to skip it."""
    if event.event_type == EVENT_XID_CRITICAL:
        return event.xid
    if event.event_type == EVENT_DOUBLE_BIT_ECC:
        return event.xid or DOUBLE_BIT_ECC_XID
    return None  # single-bit ECC errors are corrected and other types say nothing of health
