"""Timer triggers in the local host: NCRONTAB schedules, runOnStartup, %SETTING% schedules, and the TimerRequest
the real runtime hands the function."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devkit._protos import protos
from devkit._timer import BadSchedule, Schedule, TimerRunner, TimerTrigger
from tests.harness import LoopThread, eventually, running_host


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(("expression", "after", "expected"), [
    ("*/5 * * * * *", "2026-11-30T10:00:03", "2026-11-30T10:00:05"),
    ("0 */5 * * * *", "2026-11-30T10:00:00", "2026-11-30T10:05:00"),
    ("0 17 * * * *", "2026-11-30T10:17:00", "2026-11-30T11:17:00"),
    ("0 30 9 * * 1-5", "2026-11-27T10:00:00", "2026-11-30T09:30:00"),  # Friday after 9:30: Monday
    ("0 30 9 * * MON-FRI", "2026-11-28T00:00:00", "2026-11-30T09:30:00"),
    ("0 0 0 1 JAN *", "2026-11-30T00:00:00", "2027-01-01T00:00:00"),
    ("0 0 12 29 2 *", "2026-03-01T00:00:00", "2028-02-29T12:00:00"),
    ("0 0 0 * * 7", "2026-11-30T00:00:00", "2026-12-06T00:00:00"),  # 7 is Sunday too
    ("5,10 * * * *", "2026-11-30T10:05:00", "2026-11-30T10:10:00"),  # five fields: seconds 0
    ("0 0 0 13 * 5", "2026-11-30T00:00:00", "2027-08-13T00:00:00"),  # day AND day-of-week, as NCRONTAB
])
def test_schedule_next_occurrence(expression: str, after: str, expected: str) -> None:
    assert Schedule.parse(expression).next_after(at(after)) == at(expected)


@pytest.mark.parametrize("expression", ["", "* * * *", "61 * * * * *", "* * * * * MONDAY", "*/0 * * * * *",
                                        "0 0 0 31 2 *", "5-1 * * * * *", "x * * * * *"])
def test_bad_schedules_are_refused(expression: str) -> None:
    with pytest.raises(BadSchedule):
        Schedule.parse(expression).next_after(at("2026-11-30T00:00:00"))


async def test_runner_follows_the_schedule_on_the_injected_clock() -> None:
    """runOnStartup runs once at once; then each occurrence, with the JSON the TimerRequest converter reads."""
    now = [at("2026-11-30T10:00:58.5").timestamp()]
    calls: list[dict[str, Any]] = []

    async def sleep(seconds: float) -> None:
        if len(calls) >= 3:
            await asyncio.Event().wait()  # enough: wait to be stopped
        now[0] += seconds + 0.25  # the host wakes a little late
        await asyncio.sleep(0)

    async def invoke(trigger: TimerTrigger, invocation_id: str, data: list[Any]) -> Any:
        calls.append(json.loads(data[0].data.json))
        return protos.InvocationResponse(invocation_id=invocation_id,
                                         result=protos.StatusResult(status=protos.StatusResult.Success))

    trigger = TimerTrigger("tick", "id", "timer", Schedule.parse("0 * * * * *"), run_on_startup=True)
    runner = TimerRunner([trigger], invoke=invoke, clock=lambda: now[0], sleep=sleep)
    runner.start()
    for _ in range(100):
        await asyncio.sleep(0)
        if len(calls) >= 3:
            break
    await runner.stop()
    assert [c["IsPastDue"] for c in calls] == [False, False, False]
    assert [c["ScheduleStatus"]["Next"] for c in calls] == [
        "2026-11-30T10:01:00+00:00", "2026-11-30T10:02:00+00:00", "2026-11-30T10:03:00+00:00"]
    assert calls[0]["ScheduleStatus"]["Last"] is None
    assert calls[1]["ScheduleStatus"]["Last"].startswith("2026-11-30T10:00:58")
    assert calls[2]["ScheduleStatus"]["LastUpdated"].startswith("2026-11-30T10:02:00.25")


TIMER_APP = '''
import json
import os

import azure.functions as func

app = func.FunctionApp()


@app.timer_trigger(schedule="%TICK_SCHEDULE%", arg_name="timer", run_on_startup=True)
async def tick(timer: func.TimerRequest) -> None:
    with open(os.environ["SEEN_FILE"], "a") as seen:
        seen.write(json.dumps({"past_due": timer.past_due, "status": timer.schedule_status}) + "\\n")


@app.timer_trigger(schedule="%NOT_SET%", arg_name="timer")
def never(timer: func.TimerRequest) -> None:
    raise RuntimeError("a schedule that does not resolve must not run")
'''


def test_the_host_runs_timer_functions_through_the_runtime(tmp_path: Path) -> None:
    """On start-up and then every second, with a TimerRequest the function can read; an unresolvable schedule
    is not run. run_timer invokes one at once, as the admin API does."""
    (tmp_path / "function_app.py").write_text(TIMER_APP)
    (tmp_path / "host.json").write_text('{"version": "2.0"}')
    seen = tmp_path / "seen.jsonl"
    settings = {"TICK_SCHEDULE": "*/1 * * * * *", "SEEN_FILE": str(seen)}

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in seen.read_text().splitlines()] if seen.is_file() else []

    loop = LoopThread()
    try:
        with running_host(loop, tmp_path, settings) as (_, host):
            eventually(lambda: len(lines()) >= 3, timeout=20, message=lines)
            assert {line["past_due"] for line in lines()} == {False}
            assert all(line["status"]["Next"] and line["status"]["LastUpdated"] for line in lines())
            assert loop.run(host.run_timer("tick")) is True
    finally:
        loop.close()
