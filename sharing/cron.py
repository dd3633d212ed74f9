"""Cron expressions of `migReconfiguration.schedule`, read with crontab's meaning.

Five fields are a standard crontab line (minute hour day-of-month month day-of-week); six fields
put a seconds field first (as Quartz and robfig/cron do), for schedules and demos that must fire
within a minute. Day-of-week numbers mean what they mean in crontab (0 and 7 are Sunday, 1 is
Monday): APScheduler 3 counts 0 as Monday, so the field is rewritten as day names before
APScheduler sees it. Names (`mon-fri`), ranges, lists and steps are accepted. Pure.
"""

from __future__ import annotations

import re
from datetime import tzinfo

from apscheduler.triggers.cron import CronTrigger

MAX_EXPRESSION = 200  # characters; longer is an error, not a slow parse
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_ITEM = re.compile(r"(?P<range>\*|[0-7a-z]+(?:-[0-7a-z]+)?)(?:/(?P<step>\d+))?")


def _day(token: str) -> int:
    """A crontab day-of-week token (0-7 or a name) as 0 (Sunday) … 6."""
    if token.isdigit():
        number = int(token)
        if number > 7:
            raise ValueError(f"day of week {token} is out of range 0-7")
        return number % 7
    if token in DAYS:
        return DAYS.index(token)
    raise ValueError(f'day of week "{token}" is not a number 0-7 or one of {", ".join(DAYS)}')


def _days_of(item: str) -> set[int]:
    """The days (0 = Sunday) one comma-separated item of the day-of-week field selects."""
    match = _DOW_ITEM.fullmatch(item)
    if match is None:
        raise ValueError(f'day of week "{item}" is not a day, a range a-b or a step */n')
    step = int(match["step"]) if match["step"] else 1
    if step < 1:
        raise ValueError(f'day of week "{item}": the step must be >= 1')
    if match["range"] == "*":
        first, last = 0, 6
    else:
        low, _, high = match["range"].partition("-")
        first = _day(low)
        if not high:
            last = 6 if match["step"] else first  # "1/2" is "1-6/2", as in crontab
        elif high == "7" or (high == "sun" and first > 0):
            last = 7  # a range ending on Sunday ("5-7", "fri-sun") wraps past Saturday
        else:
            last = _day(high)
        if last < first:
            raise ValueError(f'day of week "{item}": the range runs backwards')
    return {day % 7 for day in range(first, last + 1, step)}


def _day_of_week_field(field: str) -> str:
    """The crontab day-of-week field as APScheduler day names (`*` stays `*`)."""
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.lower().split(","):
        days |= _days_of(item)
    return ",".join(DAYS[d] for d in sorted(days))


def cron_trigger(expression: str, timezone: tzinfo | str | None = None) -> CronTrigger:
    """The APScheduler trigger of a 5-field crontab line or a 6-field line with seconds first.

    Raises:
        ValueError: the expression is malformed; the message says which field and why.
    """
    if not isinstance(expression, str):
        raise ValueError(f"must be a cron expression string, got {expression!r}")
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"a cron expression is at most {MAX_EXPRESSION} characters")
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f'"{expression}" has {len(fields)} fields; a cron expression has 5 (minute hour '
            "day-of-month month day-of-week) or 6 (seconds first)"
        )
    seconds = fields.pop(0) if len(fields) == 6 else "0"
    try:
        fields[4] = _day_of_week_field(fields[4])
        trigger = CronTrigger.from_crontab(" ".join(fields), timezone=timezone)
        if seconds != "0":
            trigger = CronTrigger(
                second=seconds, minute=fields[0], hour=fields[1], day=fields[2],
                month=fields[3], day_of_week=fields[4], timezone=trigger.timezone,
            )
    except ValueError as err:
        raise ValueError(f'"{expression}" is not a valid cron expression: {err}') from err
    return trigger


__all__ = ["cron_trigger"]
