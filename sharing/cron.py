"""Cron expressions of `migReconfiguration.schedule`, read with crontab's meaning.

Five fields are a standard crontab line (minute hour day-of-month month day-of-week); six fields
put a seconds field first (as Quartz and robfig/cron do), for schedules and demos that must fire
within a minute. Day-of-week numbers mean what they mean in crontab (0 and 7 are Sunday, 1 is
Monday): APScheduler 3 counts 0 as Monday, so the field is rewritten as day names before
APScheduler sees it. Names (`mon-fri`), ranges, lists and steps are accepted. Pure.

An expression that never fires (`0 0 31 2 *`: no February 31st) is an error: APScheduler would
look for its next time up to the year 9999, a fraction of a second each time it is asked, which
held up the daemon's start and every `gpushare mig status`.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone, tzinfo

from apscheduler.triggers.cron import CronTrigger

MAX_EXPRESSION = 200  # characters; longer is an error, not a slow parse
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# Whether a date matches depends only on its year's type (leap or not, the weekday of January 1st),
# and the 28 years from 2001 hold all 14 types: an expression that fires at all fires in them.
_CYCLE_START = datetime(2001, 1, 1, tzinfo=timezone.utc)
_CYCLE_END = datetime(2029, 1, 1, tzinfo=timezone.utc)
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


@functools.lru_cache(maxsize=256)
def _some_day_matches(day: str, month: str, day_of_week: str) -> bool:
    """Whether any date has this day of month, month and day of week (checked fields).

    Only these fields can make an expression never fire (every other field has a value in each
    day); the answer is kept, so a schedule repeating them costs one search.
    """
    probe = CronTrigger(second="0", minute="0", hour="0", day=day, month=month,
                        day_of_week=day_of_week, timezone=_CYCLE_START.tzinfo,
                        start_date=_CYCLE_START, end_date=_CYCLE_END)
    return probe.get_next_fire_time(None, _CYCLE_START) is not None


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
        when = dict(zip(("minute", "hour", "day", "month", "day_of_week"), fields, strict=True))
        trigger = CronTrigger(second=seconds, **when, timezone=timezone)
    except ValueError as err:
        raise ValueError(f'"{expression}" is not a valid cron expression: {err}') from err
    if not _some_day_matches(when["day"], when["month"], when["day_of_week"]):
        raise ValueError(
            f'"{expression}" never fires: no date has that day of month in that month'
            " (and day of week)"
        )
    return trigger


__all__ = ["cron_trigger"]
