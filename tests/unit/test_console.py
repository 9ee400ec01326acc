"""registry.console: parsing what people type and formatting what they read."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from registry import InvalidInputError, ResumeDecisionAction, RunRecord, RunStatus
from registry.console import (
    format_duration,
    format_interval,
    format_time,
    jsonable,
    parse_decisions,
    parse_duration,
    parse_since,
    print_json,
    run_json,
    write_csv,
)

#: a zone without daylight saving time, so that local times are the same all year
LOCAL_ZONE = "Asia/Kolkata"

DECISION = {"target_id": "call-1", "action": "resume", "result": {"ok": True}, "updated_at": 1}


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        (" 1H 30M ", 5400),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "7x", "d7", "1h-30m", "1.5h", "h", "7d later"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_duration(text)
    assert caught.value.field == "duration"
    assert caught.value.reason == f"{text!r} is not a duration such as 7d, 12h, 30m or 1h30m"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=7), "7d"),
        (timedelta(weeks=2), "14d"),
        (timedelta(days=1, hours=2, minutes=3, seconds=4), "1d2h3m4s"),
        (timedelta(seconds=59.9), "59s"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize("text", ["0s", "45s", "1h30m", "7d", "1d2h3m4s", "3d59s"])
def test_format_duration_round_trips_through_parse_duration(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


# --- latencies and times --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (timedelta(milliseconds=4.2), "4.2 ms"),
        (timedelta(milliseconds=380), "380 ms"),
        (timedelta(seconds=2.514), "2.51 s"),
        (timedelta(minutes=3, seconds=5), "3m 05s"),
        (timedelta(hours=2, minutes=7), "2h 07m"),
        (timedelta(hours=47, minutes=59), "47h 59m"),
        (timedelta(days=3, hours=4), "3d 04h"),
    ],
)
def test_format_interval(value: timedelta | None, text: str) -> None:
    assert format_interval(value) == text


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC+05:30 for the test."""
    monkeypatch.setenv("TZ", LOCAL_ZONE)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_zone")
def test_format_time_is_local_time_to_the_second() -> None:
    assert format_time(datetime(2026, 11, 25, 14, 0, 7, 999999, tzinfo=UTC)) == (
        "2026-11-25 19:30:07"
    )
    assert format_time(None) == "-"


# --- points in time -------------------------------------------------------------------------------


def test_parse_since_a_duration_ago() -> None:
    before = datetime.now(UTC)
    moment = parse_since("2h")
    after = datetime.now(UTC)
    assert before - timedelta(hours=2) <= moment <= after - timedelta(hours=2)


@pytest.mark.usefixtures("local_zone")
def test_parse_since_iso_8601() -> None:
    aware = parse_since("2026-11-25T14:00:00+02:00")
    assert aware == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    naive = parse_since(" 2026-11-25 ")
    assert naive.utcoffset() == timedelta(hours=5, minutes=30), "naive means local time"
    assert naive == datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
    assert parse_since("2026-11-25T14:00") == datetime(2026, 11, 25, 8, 30, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "", "2026-13-01", "7x"])
def test_parse_since_refuses_what_is_neither(text: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_since(text)
    assert caught.value.field == "time"
    assert "is neither a duration (2h, 7d) nor an ISO 8601 time" in caught.value.reason


# --- decisions ------------------------------------------------------------------------------------


def test_parse_decisions_one_object_or_an_array() -> None:
    [one] = parse_decisions(json.dumps(DECISION))
    assert one.target_id == "call-1"
    assert one.action is ResumeDecisionAction.RESUME
    assert one.result == {"ok": True}
    cancel = {"target_id": "call-2", "action": "cancel", "reason": "no", "updated_at": 2}
    many = parse_decisions(json.dumps([DECISION, cancel]))
    assert [decision.to_dict() for decision in many] == [
        {**DECISION, "decision_id": ""},
        {**cancel, "decision_id": ""},
    ]


def test_parse_decisions_reads_a_file_and_standard_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps([DECISION]), encoding="utf-8")
    assert [d.target_id for d in parse_decisions(f"@{path}")] == ["call-1"]
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({**DECISION, "target_id": "in"})))
    assert [d.target_id for d in parse_decisions("@-")] == ["in"]


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("{not json", "--decision", "not JSON: "),
        ("[]", "--decision", "expected a JSON object or a non-empty array"),
        ("42", "--decision", "expected a JSON object or a non-empty array"),
        ("@/nonexistent/decisions.json", "--decision", "cannot read /nonexistent/decisions.json"),
        (json.dumps([DECISION, 7]), "decisions[1]", "expected a JSON object"),
        (
            json.dumps([DECISION, {**DECISION, "action": "maybe"}]),
            "decisions[1].action",
            "must be 'resume' or 'cancel'",
        ),
        (json.dumps({"target_id": "c", "updated_at": 1}), "decisions[0].action", ""),
    ],
)
def test_parse_decisions_names_the_offending_field(text: str, field: str, reason: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_decisions(text)
    assert caught.value.field == field
    assert caught.value.reason.startswith(reason)
    assert not caught.value.reason.startswith("Value error, ")
    assert str(caught.value) == f"{field}: {caught.value.reason}"


# --- output for programs --------------------------------------------------------------------------


def test_jsonable_and_print_json(capsys: pytest.CaptureFixture[str]) -> None:
    moment = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    value = {"at": moment, "after": timedelta(milliseconds=1500), "status": RunStatus.ACTIVE}
    assert jsonable({1: [value], "t": ("é",)}) == {
        "1": [{"at": "2026-11-25T14:00:00+00:00", "after": 1.5, "status": "active"}],
        "t": ["é"],
    }
    print_json(value)
    assert json.loads(capsys.readouterr().out) == jsonable(value)


def test_run_json() -> None:
    moment = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    record = RunRecord(
        run_id="r",
        thread_id="t",
        agent_id="a",
        status=RunStatus.COMPLETED,
        owner_id=None,
        cancel_requested_at=None,
        created_at=moment,
        updated_at=moment,
        ended_at=moment,
        end_reason="removed",
    )
    assert jsonable(run_json(record)) == {
        "run_id": "r",
        "thread_id": "t",
        "agent_id": "a",
        "status": "completed",
        "owner_id": None,
        "cancel_requested_at": None,
        "created_at": "2026-11-25T14:00:00+00:00",
        "updated_at": "2026-11-25T14:00:00+00:00",
        "ended_at": "2026-11-25T14:00:00+00:00",
        "end_reason": "removed",
    }


def test_write_csv(capsys: pytest.CaptureFixture[str]) -> None:
    write_csv([])
    assert capsys.readouterr().out == ""
    write_csv(
        [
            {"id": 1, "result": {"a": "é"}, "ack_latency": timedelta(seconds=2)},
            {"id": 2, "result": None, "ack_latency": None},
        ]
    )
    assert capsys.readouterr().out == 'id,result,ack_latency\n1,"{""a"": ""é""}",2.0\n2,null,\n'
