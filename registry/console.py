"""What the command line shows people and reads from them, apart from the commands themselves.

Tables and the console they print to, times, latencies and durations for people, JSON and CSV
output for programs, and parsing of the text people type (durations, points in time,
decisions). Parsers raise :class:`~registry.errors.InvalidInputError`; the command line turns
it into a usage error. Output goes to standard output.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import enum
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, cast

from rich import box
from rich.console import Console
from rich.table import Table

from registry.embedded import EmbeddedStatus
from registry.errors import InvalidInputError
from registry.models import RunRecord, RunStatus, StreamChunk, ToolCallDecision

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: columns whose values (ids, states) may fold onto several lines in a narrow terminal
_FOLDING_COLUMNS = {"RUN", "THREAD", "AGENT", "OWNER", "DECISION", "TARGET", "STATUS"}


# --- tables ---------------------------------------------------------------------------------------


def output_console() -> Console:
    """The console tables go to: as wide as the terminal, and wide when writing to a file."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        # in a file or a pipe: no wrapping at 80 columns, no padding at the end of lines
        console = Console(
            file=cast(IO[str], _TrimmedLines(sys.stdout)),  # rich needs only write/flush
            highlight=False,
            soft_wrap=False,
            width=int(os.environ.get("COLUMNS", "") or 200),
        )
    return console


class _TrimmedLines:
    """A text stream that drops the spaces rich pads table lines with."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._pending = ""
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._stream.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return int(self._stream.fileno())


def make_table(*columns: str, title: str | None = None) -> Table:
    """An empty table in the command line's style, with ``columns`` as headers.

    Id and status columns fold when the terminal is narrow; the others keep one line.
    """
    table = Table(
        box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False
    )
    for name in columns:
        wrap = name in _FOLDING_COLUMNS
        table.add_column(name, overflow="fold" if wrap else "ellipsis", no_wrap=not wrap)
    return table


def overview_grid() -> Table:
    """A two-column grid without borders, for ``name  value`` lines."""
    return Table.grid(padding=(0, 2))


def audit_table(
    rows: Iterable[Mapping[str, Any]], *, title: str | None = None, one_run: bool = False
) -> Table:
    """Rows of the ``decision_audit`` view as a table for people.

    ``one_run`` leaves out the run and agent columns, for rows that all belong to one run.
    """
    columns = ["ID", "RUN", "AGENT"] if not one_run else ["ID"]
    columns += ["DECISION", "TARGET", "ACTION", "STATUS", "ATTEMPTS", "RECEIVED"]
    columns += ["DELIVERED AFTER", "ACKED AFTER", "RUN STATUS"]
    table = make_table(*columns, title=title)
    for row in rows:
        cells = [str(row["id"])] + ([row["run_id"], row["agent_id"]] if not one_run else [])
        cells += [
            row["decision_id"] or "-",
            row["target_id"],
            row["action"],
            decision_state(row),
            str(row["attempts"]),
            format_time(row["received_at"]),
            format_interval(row["delivery_latency"]),
            format_interval(row["ack_latency"]),
            row["run_status"],
        ]
        table.add_row(*cells)
    return table


def runs_table(records: Iterable[RunRecord]) -> Table:
    """Runs as a table for people, one line each, a pending cancel shown with the status."""
    table = make_table("RUN", "THREAD", "AGENT", "STATUS", "OWNER", "CREATED", "ENDED")
    for record in records:
        state = record.status.value
        if record.status is RunStatus.ACTIVE and record.cancel_requested_at is not None:
            state += " (cancel requested)"
        table.add_row(
            record.run_id,
            record.thread_id,
            record.agent_id,
            state,
            record.owner_id or "-",
            format_time(record.created_at),
            format_time(record.ended_at),
        )
    return table


def run_overview(
    columns: Mapping[str, Any], *, stored_chunks: int, stream_seq: int | None
) -> Table:
    """A run's columns as ``name  value`` lines, then its stream's length."""
    overview = overview_grid()
    for key, value in columns.items():
        shown = format_time(value) if isinstance(value, datetime) else value
        overview.add_row(key.replace("_", " "), "-" if shown is None else str(shown))
    if stream_seq is None:
        overview.add_row("stream", "none (never opened, or pruned)")
    else:
        overview.add_row("stream", f"{stored_chunks} chunks stored, last seq {stream_seq}")
    return overview


def decisions_table(decisions: Sequence[Mapping[str, Any]]) -> Table:
    """A run's decisions (rows of ``decisions``) as a table for people, titled with their count."""
    columns = ("ID", "DECISION", "TARGET", "ACTION", "STATUS", "ATTEMPTS")
    table = make_table(
        *columns, "RECEIVED", "DELIVERED", "ACKED", title=f"decisions ({len(decisions)})"
    )
    for decision in decisions:
        table.add_row(
            str(decision["id"]),
            decision["decision_id"] or "-",
            decision["target_id"],
            decision["action"],
            decision_state(decision),
            str(decision["attempts"]),
            format_time(decision["received_at"]),
            format_time(decision["delivered_at"]),
            format_time(decision["acked_at"]),
        )
    return table


def counts_table(title: str, counts: Mapping[str, int]) -> Table:
    """Row counts by status, titled ``title``."""
    table = make_table("STATUS", "COUNT", title=title)
    for status, count in counts.items():
        table.add_row(status, str(count))
    return table


def embedded_overview(status: EmbeddedStatus) -> Table:
    """The embedded server's state, data directory, version and URL, for people."""
    overview = overview_grid()
    if status.running:
        state = f"running (pid {status.pid}, since {format_time(status.started_at)})"
    elif status.initialized:
        state = "stopped"
    else:
        state = "not created yet (any command without a database URL creates it)"
    overview.add_row("embedded PostgreSQL", state)
    overview.add_row("data", str(status.data_dir))
    if status.version is not None:
        overview.add_row("version", f"PostgreSQL {status.version}")
    if status.url is not None:
        overview.add_row("url", status.url)
    return overview


def embedded_json(status: EmbeddedStatus) -> dict[str, Any]:
    """The embedded server's state as JSON for programs (``started_at`` as ISO 8601)."""
    return {
        "data_dir": str(status.data_dir),
        "initialized": status.initialized,
        "running": status.running,
        "pid": status.pid,
        "url": status.url,
        "started_at": status.started_at,
        "postgres_version": status.version,
    }


def decision_state(row: Mapping[str, Any]) -> str:
    """A decision row's status, with the drop reason if it was dropped."""
    status = str(row["status"])
    return status + (f" ({row['drop_reason']})" if row["drop_reason"] else "")


# --- values for people ----------------------------------------------------------------------------


def format_time(value: datetime | None) -> str:
    """A timestamp in local time for people, ``-`` when absent."""
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_interval(value: timedelta | None) -> str:
    """A latency for people: ``4.2 ms``, ``380 ms``, ``2.51 s``, ``3m 05s``; ``-`` if absent."""
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, second = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {second:02d}s"
    hours, minute = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minute:02d}m"
    days, hour = divmod(hours, 24)
    return f"{days}d {hour:02d}h"


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration` in whole seconds: ``7d``, ``1h30m``, ``0s``."""
    remaining = int(value.total_seconds())
    parts = []
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, seconds)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# --- text people type -----------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or combinations like ``1h30m``.

    Raises :class:`InvalidInputError` (field ``duration``) for anything else.
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not parts or "".join(number + unit for number, unit in parts) != compact:
        raise InvalidInputError(
            "duration", f"{text!r} is not a duration such as 7d, 12h, 30m or 1h30m"
        )
    return timedelta(seconds=sum(int(number) * _DURATION_UNITS[unit] for number, unit in parts))


def parse_since(text: str) -> datetime:
    """A point in time: a duration ago (``2h``) or an ISO 8601 date or time (local if naive).

    Always timezone-aware. Raises :class:`InvalidInputError` (field ``time``) for anything else.
    """
    text = text.strip()
    with contextlib.suppress(InvalidInputError):
        return datetime.now(UTC) - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            "time",
            f"{text!r} is neither a duration (2h, 7d) nor an ISO 8601 time "
            "(2026-11-25 or 2026-11-25T14:00)",
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def parse_decisions(text: str) -> list[ToolCallDecision]:
    """A JSON object or array of objects in the decision shape; ``@file`` / ``@-`` read it.

    Raises :class:`InvalidInputError` naming the offending field (``decisions[1].action``),
    or ``--decision`` when the text as a whole is unusable.
    """
    source = text
    if text.startswith("@"):
        path = text[1:]
        try:
            source = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError("--decision", f"cannot read {path}: {exc.strerror}") from exc
    try:
        document = json.loads(source)
    except json.JSONDecodeError as exc:
        raise InvalidInputError("--decision", f"not JSON: {exc}") from exc
    if isinstance(document, dict):
        items: list[Any] = [document]
    elif isinstance(document, list) and document:
        items = document
    else:
        raise InvalidInputError("--decision", "expected a JSON object or a non-empty array")
    decisions = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInputError(f"decisions[{index}]", "expected a JSON object")
        try:
            decisions.append(ToolCallDecision.model_validate(item))
        except InvalidInputError as exc:
            # pydantic prefixes the messages of field validators; the field name says enough
            reason = exc.reason.removeprefix("Value error, ")
            raise InvalidInputError(f"decisions[{index}].{exc.field}", reason) from exc
    return decisions


# --- output for programs --------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` with times as ISO 8601, intervals as seconds and enums as their values."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value


def print_json(value: Any) -> None:
    """Print ``value`` as one indented JSON document (see :func:`jsonable`)."""
    sys.stdout.write(json.dumps(jsonable(value), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def run_json(record: RunRecord) -> dict[str, Any]:
    """A run record as the command line's JSON object (pass it through :func:`print_json`)."""
    return {
        "run_id": record.run_id,
        "thread_id": record.thread_id,
        "agent_id": record.agent_id,
        "status": record.status.value,
        "owner_id": record.owner_id,
        "cancel_requested_at": record.cancel_requested_at,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "ended_at": record.ended_at,
        "end_reason": record.end_reason,
    }


def write_csv(rows: list[dict[str, Any]]) -> None:
    """Print rows of the ``decision_audit`` view as CSV with a header; nothing if no rows.

    ``result`` is written as JSON, latencies in seconds, absent values as empty cells.
    """
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = jsonable(row)
        values["result"] = json.dumps(row["result"], ensure_ascii=False)
        writer.writerow(values)
    sys.stdout.flush()


class ChunkWriter:
    """Writes a run's stream chunks to standard output: their bytes, or JSON lines.

    A JSON line is ``{"seq": n, "data": text}``, or ``"data_base64"`` for bytes that are not
    UTF-8. Call :meth:`finish` at the end.
    """

    def __init__(self, as_json: bool) -> None:
        self._as_json = as_json
        self._last = b"\n"
        self._output = sys.stdout.buffer

    def write(self, chunk: StreamChunk) -> None:
        """Write one chunk and flush, so that a follower sees it at once."""
        if self._as_json:
            line: dict[str, Any] = {"seq": chunk.seq}
            try:
                line["data"] = chunk.data.decode("utf-8")
            except UnicodeDecodeError:
                line["data_base64"] = base64.b64encode(chunk.data).decode("ascii")
            self._output.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        elif chunk.data:
            self._output.write(chunk.data)
            self._last = chunk.data[-1:]
        self._output.flush()

    def finish(self) -> None:
        """End a terminal's last line if the stream did not; a file gets the bytes as they are."""
        if not self._as_json and self._last != b"\n" and sys.stdout.isatty():
            self._output.write(b"\n")
        self._output.flush()
