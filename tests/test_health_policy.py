"""XID policy: upstream defaults, DP_DISABLE/ENABLE_HEALTHCHECKS and the `health:` config."""

from __future__ import annotations

import pytest

from sharing.errors import ConfigError
from sharing.health import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    HealthSettings,
    XidPolicy,
    describe_xid,
    event_xid,
)
from tests.fakes.health import Event

IGNORED_BY_DEFAULT = (13, 31, 43, 45, 68, 109)


@pytest.mark.parametrize(
    ("disabled", "enabled", "settings", "ignored", "counted"),
    [
        pytest.param(None, None, None, IGNORED_BY_DEFAULT, (48, 74, 79, 94, 95), id="defaults"),
        pytest.param("", "", None, IGNORED_BY_DEFAULT, (79,), id="empty strings are unset"),
        pytest.param("all", None, None, (13, 48, 79), (), id="disable all turns checks off"),
        pytest.param("ALL", None, None, (79,), (), id="values are case-insensitive"),
        pytest.param("xids", None, None, (13, 48, 79, 94), (), id="disable xids ignores every XID"),
        pytest.param("79, 94", None, None, (13, 79, 94), (48, 95), id="disable list adds"),
        pytest.param(None, "13", None, (31, 43), (13, 79), id="enable list un-ignores a default"),
        pytest.param(None, "all", None, (), IGNORED_BY_DEFAULT, id="enable all ignores none"),
        pytest.param("xids", "79", None, (13, 48), (79,), id="enable wins over disable xids"),
        pytest.param("79", "79", None, (), (79,), id="enable wins over disable list"),
        pytest.param("all", "48", None, (79,), (48,), id="enable list turns checks back on"),
        pytest.param(
            None, None, HealthSettings(ignored_xids=frozenset({74})), (74,), (13, 79),
            id="config replaces the default ignored set",
        ),
        pytest.param(
            None, None, HealthSettings(disabled=True), (79, 48), (), id="config off switch",
        ),
        pytest.param(
            None, "79", HealthSettings(disabled=True), (48,), (79,),
            id="enable wins over config off",
        ),
    ],
)
def test_policy_ignores(
    disabled: str | None,
    enabled: str | None,
    settings: HealthSettings | None,
    ignored: tuple[int, ...],
    counted: tuple[int, ...],
) -> None:
    """Each XID is ignored or counted as the env values and the config say."""
    policy = XidPolicy.from_lists(disabled, enabled, settings)
    assert [x for x in ignored if not policy.is_ignored(x)] == []
    assert [x for x in counted if policy.is_ignored(x)] == []


@pytest.mark.parametrize(
    ("disabled", "enabled", "off"),
    [
        pytest.param(None, None, False, id="on by default"),
        pytest.param("all", None, True, id="disable all"),
        pytest.param("xids", None, False, id="disable xids keeps probes"),
        pytest.param("all", "all", False, id="enable all wins"),
    ],
)
def test_policy_off_switch(disabled: str | None, enabled: str | None, off: bool) -> None:
    """`disabled` is set only when nothing re-enables checks."""
    assert XidPolicy.from_lists(disabled, enabled).disabled is off


@pytest.mark.parametrize(
    ("settings", "reset", "not_reset"),
    [
        pytest.param(None, (48, 79, 95), (74, 94, 13), id="default reset-class XIDs"),
        pytest.param(
            HealthSettings(reset_required_xids=frozenset({74})), (74,), (79,), id="configured",
        ),
    ],
)
def test_policy_needs_reset(
    settings: HealthSettings | None, reset: tuple[int, ...], not_reset: tuple[int, ...]
) -> None:
    """Reset-class XIDs come from the config, 48/79/95 by default."""
    policy = XidPolicy.from_lists(None, None, settings)
    assert all(policy.needs_reset(x) for x in reset)
    assert not any(policy.needs_reset(x) for x in not_reset)


@pytest.mark.parametrize(
    ("disabled", "enabled", "message"),
    [
        pytest.param("13,foo", None, "DP_DISABLE_HEALTHCHECKS: invalid value 'foo'", id="disable"),
        pytest.param(None, "-1", "DP_ENABLE_HEALTHCHECKS: invalid value '-1'", id="enable"),
        pytest.param(
            None, "79;48", "DP_ENABLE_HEALTHCHECKS: invalid value '79;48'", id="separator"
        ),
    ],
)
def test_policy_rejects_bad_values(disabled: str | None, enabled: str | None, message: str) -> None:
    """A bad env value is an error naming the variable and the value."""
    with pytest.raises(ConfigError, match=message):
        XidPolicy.from_lists(disabled, enabled)


def test_a_huge_bad_value_is_a_short_error() -> None:
    """A 100,000-character value is named, cut short: the error was 200 KB, the value twice."""
    with pytest.raises(ConfigError, match="DP_DISABLE_HEALTHCHECKS: invalid value 'xxx") as err:
        XidPolicy.from_lists("13," + "x" * 100_000, None)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    ("event_type", "code", "judged_as"),
    [
        pytest.param(EVENT_XID_CRITICAL, 79, 79, id="critical XID"),
        pytest.param(EVENT_DOUBLE_BIT_ECC, 0, 48, id="double-bit ECC is XID 48"),
        pytest.param(EVENT_SINGLE_BIT_ECC, 0, None, id="single-bit ECC is skipped"),
        pytest.param("0x4", 0, None, id="other event types are skipped"),
    ],
)
def test_event_xid(event_type: str, code: int, judged_as: int | None) -> None:
    """Events are judged by their XID; ECC events map as documented."""
    assert event_xid(Event(0, "GPU-x", code, event_type)) == judged_as


@pytest.mark.parametrize(
    ("code", "text"),
    [
        pytest.param(79, "XID 79 (GPU has fallen off the bus)", id="known"),
        pytest.param(1234, "XID 1234", id="unknown"),
    ],
)
def test_describe_xid(code: int, text: str) -> None:
    """Log lines name the XID and, when known, what it means."""
    assert describe_xid(code) == text
