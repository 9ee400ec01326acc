"""registry.contrib.framing: where a plain SSE stream resumes, and how chunks are framed."""

from __future__ import annotations

import json

import pytest
from sse_starlette import ServerSentEvent

from registry import InvalidInputError, StreamChunk
from registry.contrib.framing import (
    UI_MESSAGE_DONE,
    agui_event,
    end_event,
    plain_event,
    resume_point,
    typed_json,
    ui_message_event,
)


@pytest.mark.parametrize(
    ("last_event_id", "after", "expected"),
    [(None, None, 0), ("7", None, 7), (None, "3", 3), ("7", "3", 7), (" ", "3", 3), ("0", "9", 0)],
)
def test_the_header_wins_over_the_parameter(
    last_event_id: str | None, after: str | None, expected: int
) -> None:
    assert resume_point(last_event_id, after) == expected


@pytest.mark.parametrize(
    ("last_event_id", "after", "field"),
    [
        ("-1", None, "Last-Event-ID"),
        ("x", None, "Last-Event-ID"),
        (None, "1.5", "after"),
        ("٣", None, "Last-Event-ID"),
    ],
)
def test_a_seq_that_is_not_one_is_refused(
    last_event_id: str | None, after: str | None, field: str
) -> None:
    with pytest.raises(InvalidInputError) as raised:
        resume_point(last_event_id, after)
    assert raised.value.field == field


def test_typed_json_is_an_object_with_a_string_type() -> None:
    assert typed_json(StreamChunk(1, b'{"type": "finish"}')) == {"type": "finish"}
    for data in (b"plain", b'{"type": 1}', b'["type"]', b'{"kind": "x"}', b"\xff"):
        assert typed_json(StreamChunk(1, data)) is None


def test_plain_events_carry_the_seq_and_the_text() -> None:
    encoded = plain_event(StreamChunk(4, "two\nlines é".encode())).encode()
    assert encoded == "id: 4\r\ndata: two\r\ndata: lines é\r\n\r\n".encode()


def data(event: ServerSentEvent) -> object:
    assert isinstance(event.data, str)
    return json.loads(event.data)


def test_json_framings_keep_parts_and_wrap_text() -> None:
    part = StreamChunk(1, b'{"type":"text-start","id":"t"}')
    text = StreamChunk(2, b"hi")
    assert data(ui_message_event(part, "run-1")) == {"type": "text-start", "id": "t"}
    assert data(ui_message_event(text, "run-1")) == {
        "type": "text-delta",
        "id": "run-1",
        "delta": "hi",
    }
    assert data(agui_event(text, "run-1")) == {
        "type": "TEXT_MESSAGE_CONTENT",
        "messageId": "run-1",
        "delta": "hi",
    }
    assert UI_MESSAGE_DONE.encode() == b"data: [DONE]\r\n\r\n"


def test_the_end_event_names_the_outcome() -> None:
    assert data(end_event(None)) == {}
    assert end_event(None).event == "end"
