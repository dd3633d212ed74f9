"""Cron expressions of migReconfiguration.schedule: crontab meaning, seconds field, errors."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from sharing.cron import cron_trigger

MONDAY_NOON = datetime(2024, 6, 3, 12, 0, 0, tzinfo=timezone.utc)  # a Monday


def _next(expression: str, after: datetime = MONDAY_NOON) -> datetime:
    return cron_trigger(expression, timezone.utc).get_next_fire_time(None, after)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        pytest.param("0 3 * * 0", datetime(2024, 6, 9, 3, 0), id="0 is Sunday, as in crontab"),
        pytest.param("0 3 * * 7", datetime(2024, 6, 9, 3, 0), id="7 is Sunday too"),
        pytest.param("0 3 * * 1", datetime(2024, 6, 10, 3, 0), id="1 is Monday"),
        pytest.param("0 3 * * 6", datetime(2024, 6, 8, 3, 0), id="6 is Saturday"),
        pytest.param("0 3 * * 5-7", datetime(2024, 6, 7, 3, 0), id="range ending on 7"),
        pytest.param("0 3 * * 0,6", datetime(2024, 6, 8, 3, 0), id="weekend list"),
        pytest.param("0 3 * * sat-sun", datetime(2024, 6, 8, 3, 0), id="names"),
        pytest.param("0 3 * * 0-7", datetime(2024, 6, 4, 3, 0), id="0-7 is every day"),
        pytest.param("0 3 * * 2/2", datetime(2024, 6, 4, 3, 0), id="step from a day"),
        pytest.param("0 13 * * */2", datetime(2024, 6, 4, 13, 0), id="every other day from Sun"),
        pytest.param("*/15 * * * *", datetime(2024, 6, 3, 12, 15), id="every 15 minutes"),
        pytest.param("30 1 12 * * *", datetime(2024, 6, 3, 12, 1, 30), id="seconds field first"),
        pytest.param("*/5 * * * * *", datetime(2024, 6, 3, 12, 0, 5), id="every 5 seconds"),
        pytest.param("0 0 29 2 *", datetime(2028, 2, 29, 0, 0), id="February 29th"),
        pytest.param("0 0 29 2 1", datetime(2044, 2, 29, 0, 0), id="February 29th, a Monday"),
        pytest.param("0 0 31 2,3 *", datetime(2025, 3, 31, 0, 0), id="31st of February or March"),
        pytest.param("0 0 last 2 *", datetime(2025, 2, 28, 0, 0), id="last day of February"),
    ],
)
def test_next_fire_time(expression: str, expected: datetime) -> None:
    """Each expression fires when crontab would (six fields: seconds first)."""
    assert _next(expression, MONDAY_NOON.replace(second=1)) == expected.replace(tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        pytest.param("0 3 * *", "has 4 fields; a cron expression has 5", id="too few fields"),
        pytest.param("0 0 3 * * * *", "has 7 fields", id="too many fields"),
        pytest.param("61 * * * *", "the last value (61) is higher than the maximum", id="minute"),
        pytest.param("0 25 * * *", "higher than the maximum value (23)", id="hour"),
        pytest.param("0 3 * * 8", 'day of week "8"', id="day of week 8"),
        pytest.param("0 3 * * 6-1", "the range runs backwards", id="backwards range"),
        pytest.param("0 3 * * funday", '"funday" is not a number 0-7', id="unknown day name"),
        pytest.param("0 3 32 * *", "higher than the maximum value (31)", id="day of month"),
        pytest.param("x" * 300, "at most 200 characters", id="too long"),
        pytest.param("0 0 31 2 *", '"0 0 31 2 *" never fires', id="February 31st"),
        pytest.param("0 0 30 2 *", "never fires", id="February 30th"),
        pytest.param("0 0 31 4,6,9,11 *", "never fires", id="31st of 30-day months"),
        pytest.param("0 0 0 31 2 *", "never fires", id="six fields, February 31st"),
    ],
)
def test_invalid_expressions(expression: str, message: str) -> None:
    """A malformed expression is a ValueError saying which part is wrong."""
    with pytest.raises(ValueError, match=re.escape(message)):
        cron_trigger(expression, timezone.utc)
