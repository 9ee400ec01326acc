"""How a run's stream chunks become server-sent events, in the three framings the HTTP routes
offer (pure functions: no I/O).

- plain SSE: one event per chunk, ``id:`` the chunk's seq (the browser's ``Last-Event-ID``),
  ``data:`` the chunk as UTF-8 text; a final ``event: end`` carries the run's outcome;
- the AI SDK UI message stream (``x-vercel-ai-ui-message-stream: v1``): ``data: <json part>``
  per chunk, ``data: [DONE]`` at the end;
- AG-UI: ``data: <json event>`` per chunk.

In the two JSON framings a chunk that is a JSON object with a string ``type`` is sent as it is
(the run published protocol parts or events); any other chunk is sent as a text delta of one
text message whose id is the run id. The events are sse-starlette's ``ServerSentEvent``, which
does the wire encoding (a ``data`` with line breaks becomes several ``data:`` lines, so a
``\\r`` in a plain chunk reaches the client as ``\\n``).
"""

from __future__ import annotations

import json
from typing import Any

from sse_starlette import ServerSentEvent

from registry.errors import InvalidInputError
from registry.models import RunRecord, StreamChunk

#: the header that tells the AI SDK's client the body is a UI message stream
UI_MESSAGE_STREAM_HEADER = ("x-vercel-ai-ui-message-stream", "v1")


def chunk_text(chunk: StreamChunk) -> str:
    """The chunk's bytes as text (UTF-8; an invalid byte becomes U+FFFD)."""
    return chunk.data.decode("utf-8", errors="replace")


def typed_json(chunk: StreamChunk) -> dict[str, Any] | None:
    """The chunk as a JSON object with a string ``type``, or ``None`` if it is not one."""
    try:
        value = json.loads(chunk.data)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value
    return None


def _json_event(value: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def plain_event(chunk: StreamChunk) -> ServerSentEvent:
    """The plain SSE event of one chunk: ``id`` its seq, ``data`` its text."""
    return ServerSentEvent(data=chunk_text(chunk), id=str(chunk.seq))


def end_event(record: RunRecord | None) -> ServerSentEvent:
    """The plain framing's last event: ``event: end``, ``data`` the run's status and reason."""
    data: dict[str, Any] = {}
    if record is not None:
        data = {
            "run_id": record.run_id,
            "status": record.status.value,
            "end_reason": record.end_reason,
        }
    return ServerSentEvent(event="end", data=json.dumps(data, separators=(",", ":")))


def ui_message_event(chunk: StreamChunk, run_id: str) -> ServerSentEvent:
    """One AI SDK UI message stream frame: the chunk's part, or a ``text-delta`` of its text."""
    part = typed_json(chunk)
    if part is None:
        part = {"type": "text-delta", "id": run_id, "delta": chunk_text(chunk)}
    return _json_event(part)


#: the AI SDK UI message stream's last frame
UI_MESSAGE_DONE = ServerSentEvent(data="[DONE]")


def agui_event(chunk: StreamChunk, run_id: str) -> ServerSentEvent:
    """One AG-UI frame: the chunk's event, or a ``TEXT_MESSAGE_CONTENT`` of its text."""
    event = typed_json(chunk)
    if event is None:
        event = {"type": "TEXT_MESSAGE_CONTENT", "messageId": run_id, "delta": chunk_text(chunk)}
    return _json_event(event)


def resume_point(last_event_id: str | None, after: str | None) -> int:
    """Where a plain SSE stream starts: after the ``Last-Event-ID`` header's seq (a browser's
    reconnect), else after ``?after=``, else from the first chunk (0).

    Raises :class:`InvalidInputError` naming the header or parameter when it is not a
    non-negative integer.
    """
    for field, value in (("Last-Event-ID", last_event_id), ("after", after)):
        if value is None or not value.strip():
            continue
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise InvalidInputError(field, f"expected a chunk seq (an integer >= 0), got {value!r}")
        return int(text)
    return 0
