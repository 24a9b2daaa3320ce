"""Timer triggers, run by the local host as the Functions host's timer extension does (one instance, UTC).

For each ``timerTrigger`` binding a task sleeps until the schedule's next occurrence and invokes the
function through the worker with the JSON the runtime's ``TimerRequest`` converter reads
(``{"Schedule": …, "ScheduleStatus": {"Last", "Next", "LastUpdated"}, "IsPastDue": …}``). The schedule is an
NCRONTAB expression, ``{second} {minute} {hour} {day} {month} {day-of-week}`` (five fields: seconds 0), or a
``%SETTING%`` that holds one; ``runOnStartup`` invokes once when the host starts. As in NCRONTAB, day and
day-of-week must both match. A failed invocation is logged; the schedule goes on. Left out: the
``hh:mm:ss`` interval form, ``WEBSITE_TIME_ZONE``, the schedule monitor (missed runs while stopped).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from devkit._protos import protos
from devkit._servicebus import UnresolvedSetting, cancel_all, resolve

log = logging.getLogger("devkit.host")

_NAMES = {
    4: {n: i for i, n in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV",
                                    "DEC"], start=1)},
    5: {n: i for i, n in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])},
}
_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
_FIELDS = ("second", "minute", "hour", "day", "month", "day-of-week")
#: a run that starts this much after its occurrence is reported as past due
PAST_DUE_SECONDS = 1.0


class BadSchedule(ValueError):
    """A schedule that is not an NCRONTAB expression."""


def _value(text: str, field: int) -> int:
    upper = text.upper()
    names = _NAMES.get(field, {})
    if upper in names:
        return names[upper]
    if not text.isdigit():
        raise BadSchedule(f"{text!r} is not a {_FIELDS[field]}")
    value = int(text)
    if field == 5 and value == 7:
        return 0  # Sunday, either end
    low, high = _RANGES[field]
    if not low <= value <= high:
        raise BadSchedule(f"{_FIELDS[field]} {value} is outside {low}-{high}")
    return value


def _field(text: str, field: int) -> frozenset[int]:
    low, high = _RANGES[field]
    values: set[int] = set()
    for part in text.split(","):
        spec, _, step_text = part.partition("/")
        if step_text and (not step_text.isdigit() or int(step_text) == 0):
            raise BadSchedule(f"{part!r}: the step must be a whole number > 0")
        step = int(step_text) if step_text else 1
        if spec == "*":
            first, last = low, high
        elif "-" in spec:
            start, _, end = spec.partition("-")
            first, last = _value(start, field), _value(end, field)
        else:
            first = _value(spec, field)
            last = high if step_text else first
        if last < first:
            raise BadSchedule(f"{part!r}: the range runs backwards")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A parsed NCRONTAB expression; ``next_after`` gives its next occurrence."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        parts = expression.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise BadSchedule(f"{expression!r} is not an NCRONTAB expression of six fields "
                              "({second} {minute} {hour} {day} {month} {day-of-week})")
        fields = [_field(text, i) for i, text in enumerate(parts)]
        return cls(expression, *fields)

    def _day_matches(self, day: datetime) -> bool:
        return (day.month in self.months and day.day in self.days
                and (day.weekday() + 1) % 7 in self.weekdays)

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (UTC)."""
        start = moment.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        day = start.replace(hour=0, minute=0, second=0)
        for _ in range(366 * 8):  # leap days on a given weekday recur within 28 years; 8 years is plenty here
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        for second in sorted(self.seconds):
                            candidate = day.replace(hour=hour, minute=minute, second=second)
                            if candidate >= start:
                                return candidate
            day += timedelta(days=1)
        raise BadSchedule(f"{self.expression!r} has no occurrence in the next eight years")


@dataclass(frozen=True, slots=True)
class TimerTrigger:
    """One function's ``timerTrigger`` binding, with its schedule resolved and parsed."""

    function: str
    function_id: str
    arg_name: str
    schedule: Schedule
    run_on_startup: bool


def timer_trigger(function: str, function_id: str, binding: Mapping[str, Any], env: Mapping[str, str]) -> TimerTrigger:
    """Raises ``UnresolvedSetting`` or ``BadSchedule`` for a schedule the host cannot run."""
    expression = resolve(str(binding.get("schedule", "")), env)
    return TimerTrigger(function, function_id, str(binding.get("name", "timer")), Schedule.parse(expression),
                        bool(binding.get("runOnStartup", False)))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def timer_data(*, last: datetime | None, next_run: datetime, now: datetime, past_due: bool) -> Any:
    """The trigger's value as the host sends it: JSON the runtime's TimerRequest converter decodes."""
    return protos.TypedData(json=json.dumps({
        "Schedule": {"AdjustForDST": True},
        "ScheduleStatus": {"Last": _iso(last), "Next": _iso(next_run), "LastUpdated": _iso(now)},
        "IsPastDue": past_due,
    }))


InvokeTimer = Callable[[TimerTrigger, str, list[Any]], Awaitable[Any]]


class TimerRunner:
    """Runs each timer trigger on its schedule until ``stop``; ``clock`` (epoch seconds) and ``sleep`` are
    injectable, so a test can run a schedule without waiting for it."""

    def __init__(self, triggers: list[TimerTrigger], *, invoke: InvokeTimer,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.triggers = {t.function: t for t in triggers}
        self._invoke = invoke
        self._clock = clock
        self._sleep = sleep
        self._last: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def start(self) -> None:
        for trigger in self.triggers.values():
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(trigger), name=trigger.function))
            log.info("function %s runs on schedule %r%s", trigger.function, trigger.schedule.expression,
                     " and on start-up" if trigger.run_on_startup else "")

    async def _run(self, trigger: TimerTrigger) -> None:
        if trigger.run_on_startup:
            now = self._now()
            await self.fire(trigger.function, scheduled=now)
        while True:
            now = self._now()
            due = trigger.schedule.next_after(now)
            await self._sleep((due - now).total_seconds())
            if self._now() < due:
                continue  # woken early (a clock moved back, a short sleep): wait again
            await self.fire(trigger.function, scheduled=due)

    async def fire(self, function: str, *, scheduled: datetime | None = None) -> bool:
        """Invoke ``function`` now (as its schedule would, or as the host's admin API does); True if it succeeded."""
        trigger = self.triggers[function]
        now = self._now()
        past_due = scheduled is not None and (now - scheduled).total_seconds() > PAST_DUE_SECONDS
        data = timer_data(last=self._last.get(function), next_run=trigger.schedule.next_after(now), now=now,
                          past_due=past_due)
        self._last[function] = now
        invocation_id = str(uuid.uuid4())
        answer = await self._invoke(trigger, invocation_id, [protos.ParameterBinding(name=trigger.arg_name,
                                                                                      data=data)])
        if answer.result.status != protos.StatusResult.Success:
            log.error("function %s failed (invocation %s): %s", function, invocation_id,
                      answer.result.exception.message)
            return False
        return True

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []


__all__ = ["BadSchedule", "Schedule", "TimerRunner", "TimerTrigger", "UnresolvedSetting", "timer_trigger"]
