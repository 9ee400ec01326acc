"""What the command line shows people and reads from them, apart from the commands themselves.

Tables and the console they print to, times, latencies and durations for people, JSON and CSV
output for programs, and parsing of the text people type (durations, points in time,
decisions). Parsers raise :class:`~registry.errors.InvalidInputError`; the command line turns
it into a usage error. Output goes to standard output.

Whatever the tables show that came from the database or from a person (ids, reasons, URLs,
paths) is data, never markup: it goes into a table as :func:`literal` text, with the
characters that would steer a terminal (ESC, other controls, bidirectional overrides) shown
as escapes such as ``\\x1b`` (see :func:`printable`).
"""

from __future__ import annotations

import base64
import csv
import enum
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any, cast

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from registry.embedded import EmbeddedStatus
from registry.errors import InvalidInputError
from registry.locate import DATABASE_URL_VARIABLE, DatabaseLocation, DatabaseSource
from registry.models import RunRecord, RunStatus, StreamChunk, ToolCallDecision
from registry.schema import SchemaStatus

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest duration accepted (``--older-than``, ``--since``): a thousand years back is
#: still a time both Python and PostgreSQL can hold.
MAX_DURATION = timedelta(days=365_000)
#: The deepest nesting of a ``--decision`` document (the decision object is level 1).
MAX_DECISION_DEPTH = 200
#: The most bytes ``--decision @FILE`` reads.
MAX_DECISION_BYTES = 16 * 1024 * 1024
#: characters that must not reach a terminal as they are: C0 and C1 controls (ESC starts the
#: sequences that move the cursor or recolor), line separators, bidirectional overrides, and
#: lone surrogates (which cannot even be encoded)
_UNPRINTABLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
#: what JSON leaves raw but a terminal would act on (JSON escapes the C0 controls itself)
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: columns whose values (ids, states) may fold onto several lines in a narrow terminal
_FOLDING_COLUMNS = {"RUN", "THREAD", "AGENT", "OWNER", "DECISION", "TARGET", "STATUS"}


# --- text for terminals ---------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with every character that could steer a terminal written as an escape.

    A stored ESC prints as the four characters ``\\x1b``, a line separator as ``\\u2028``;
    markup characters stay as they are (a :func:`literal` prints them as such).
    """
    return _UNPRINTABLE.sub(_escape_character, text)


def _escape_character(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def literal(value: object) -> Text:
    """``value`` as text rich prints as it is: no markup, no emoji codes, no control characters."""
    return Text(printable(str(value)))


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
        cells = [row["id"]] + ([row["run_id"], row["agent_id"]] if not one_run else [])
        cells += [
            row["decision_id"] or "-",
            row["target_id"],
            row["action"],
            decision_state(row),
            row["attempts"],
            format_time(row["received_at"]),
            format_interval(row["delivery_latency"]),
            format_interval(row["ack_latency"]),
            row["run_status"],
        ]
        table.add_row(*(literal(cell) for cell in cells))
    return table


def runs_table(records: Iterable[RunRecord]) -> Table:
    """Runs as a table for people, one line each, a pending cancel shown with the status, and
    the reason of a run that failed or was interrupted."""
    table = make_table("RUN", "THREAD", "AGENT", "STATUS", "OWNER", "CREATED", "ENDED")
    for record in records:
        state = record.status.value
        if record.status is RunStatus.ACTIVE and record.cancel_requested_at is not None:
            state += " (cancel requested)"
        elif record.status in (RunStatus.FAILED, RunStatus.INTERRUPTED) and record.end_reason:
            state += f": {quoted(record.end_reason)}"
        cells = (
            record.run_id,
            record.thread_id,
            record.agent_id,
            state,
            record.owner_id or "-",
            format_time(record.created_at),
            format_time(record.ended_at),
        )
        table.add_row(*(literal(cell) for cell in cells))
    return table


def run_overview(
    columns: Mapping[str, Any], *, stored_chunks: int, stream_seq: int | None
) -> Table:
    """A run's columns as ``name  value`` lines, then its stream's length."""
    overview = overview_grid()
    for key, value in columns.items():
        shown = format_time(value) if isinstance(value, datetime) else value
        overview.add_row(literal(key.replace("_", " ")), literal("-" if shown is None else shown))
    if stream_seq is None:
        overview.add_row("stream", "none (never opened, or pruned)")
    else:
        overview.add_row("stream", literal(f"{stored_chunks} chunks stored, last seq {stream_seq}"))
    return overview


def decisions_table(decisions: Sequence[Mapping[str, Any]]) -> Table:
    """A run's decisions (rows of ``decisions``) as a table for people, titled with their count."""
    columns = ("ID", "DECISION", "TARGET", "ACTION", "STATUS", "ATTEMPTS")
    table = make_table(
        *columns, "RECEIVED", "DELIVERED", "ACKED", title=f"decisions ({len(decisions)})"
    )
    for decision in decisions:
        cells = (
            decision["id"],
            decision["decision_id"] or "-",
            decision["target_id"],
            decision["action"],
            decision_state(decision),
            decision["attempts"],
            format_time(decision["received_at"]),
            format_time(decision["delivered_at"]),
            format_time(decision["acked_at"]),
        )
        table.add_row(*(literal(cell) for cell in cells))
    return table


def counts_table(title: str, counts: Mapping[str, int]) -> Table:
    """Row counts by status, titled ``title``."""
    table = make_table("STATUS", "COUNT", title=title)
    for status, count in counts.items():
        table.add_row(literal(status), literal(count))
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
    overview.add_row("embedded PostgreSQL", literal(state))
    overview.add_row("data", literal(status.data_dir))
    if status.version is not None:
        overview.add_row("version", literal(f"PostgreSQL {status.version}"))
    if status.url is not None:
        overview.add_row("url", literal(status.url))
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

    At most :data:`MAX_DURATION`. Raises :class:`InvalidInputError` (field ``duration``) for
    anything else.
    """
    duration = _duration(text)
    if duration is None:
        raise InvalidInputError(
            "duration", f"{quoted(text)} is not a duration such as 7d, 12h, 30m or 1h30m"
        )
    return duration


def _duration(text: str) -> timedelta | None:
    """The duration ``text`` writes, ``None`` if it writes none; too long a one raises."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not parts or "".join(number + unit for number, unit in parts) != compact:
        return None
    longest = int(MAX_DURATION.total_seconds())
    seconds = 0
    for number, unit in parts:
        if len(number.lstrip("0")) > 20:  # too long, and too many digits to convert quickly
            seconds = longest + 1
            break
        seconds += int(number) * _DURATION_UNITS[unit]
    if seconds > longest:
        raise InvalidInputError(
            "duration",
            f"{quoted(text)} is longer than {format_duration(MAX_DURATION)} (1000 years)",
        )
    return timedelta(seconds=seconds)


def parse_since(text: str) -> datetime:
    """A point in time: a duration ago (``2h``) or an ISO 8601 date or time (local if naive).

    Always timezone-aware. Raises :class:`InvalidInputError` (field ``time``) for anything
    else, and for a duration longer than :data:`MAX_DURATION` or a time out of range.
    """
    text = text.strip()
    try:
        duration = _duration(text)
    except InvalidInputError as exc:
        raise InvalidInputError("time", exc.reason) from None
    if duration is not None:
        return datetime.now(UTC) - duration
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            "time",
            f"{quoted(text)} is neither a duration (2h, 7d) nor an ISO 8601 time "
            "(2026-11-25 or 2026-11-25T14:00)",
        ) from None
    try:
        moment = moment if moment.tzinfo is not None else moment.astimezone()
        # a time near the ends of the calendar fails here, not in the driver
        moment.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidInputError("time", f"{quoted(text)} is out of range") from None
    return moment


def parse_decisions(text: str) -> list[ToolCallDecision]:
    """A JSON object or array of objects in the decision shape; ``@file`` / ``@-`` read it.

    Raises :class:`InvalidInputError` naming the offending field (``decisions[1].action``),
    or ``--decision`` when the text as a whole is unusable: not UTF-8, not JSON, nested
    deeper than :data:`MAX_DECISION_DEPTH`, longer than :data:`MAX_DECISION_BYTES`.
    """
    source = _read_decisions(text[1:]) if text.startswith("@") else text
    try:
        document = json.loads(source)
    except RecursionError:
        raise InvalidInputError("--decision", _too_deep()) from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer of too many digits
        raise InvalidInputError("--decision", f"not JSON: {one_line_of(exc)}") from None
    if _depth(document) > MAX_DECISION_DEPTH:
        raise InvalidInputError("--decision", _too_deep())
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


def _read_decisions(path: str) -> str:
    """The text of ``--decision @path`` (``@-``: standard input), which must be UTF-8."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            stdin = sys.stdin
            data = (
                stdin.buffer.read(MAX_DECISION_BYTES + 1)
                if hasattr(stdin, "buffer")
                else stdin.read(MAX_DECISION_BYTES + 1).encode("utf-8", "surrogateescape")
            )
        else:
            with open(path, "rb") as file:
                data = file.read(MAX_DECISION_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or one_line_of(exc)
        raise InvalidInputError("--decision", f"cannot read {name}: {reason}") from None
    except ValueError as exc:  # a NUL in the path
        raise InvalidInputError("--decision", f"cannot read {quoted(path)}: {exc}") from None
    if len(data) > MAX_DECISION_BYTES:
        raise InvalidInputError(
            "--decision", f"{name} is longer than {MAX_DECISION_BYTES // 1024 // 1024} MiB"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            "--decision", f"{name} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x})"
        ) from None


def _depth(document: Any) -> int:
    """How deeply JSON arrays and objects nest in ``document`` (a scalar is 0), iteratively."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(document, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DECISION_DEPTH:
                break
            children = value.values() if isinstance(value, dict) else value
            pending.extend((child, depth) for child in children)
    return deepest


def _too_deep() -> str:
    return f"nested too deeply (at most {MAX_DECISION_DEPTH} levels of arrays and objects)"


def quoted(text: str, limit: int = 60) -> str:
    """``text`` as a Python literal for messages, cut short after ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def one_line_of(exc: BaseException) -> str:
    """The exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


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
    """Print ``value`` as one indented JSON document (see :func:`jsonable`).

    Characters JSON allows raw but a terminal would act on (C1 controls, line separators) are
    written as ``\\u`` escapes, which any JSON reader turns back into the same text.
    """
    document = json.dumps(jsonable(value), indent=2, ensure_ascii=False)
    sys.stdout.write(_JSON_UNSAFE.sub(_json_escape, document) + "\n")
    sys.stdout.flush()


def _json_escape(match: re.Match[str]) -> str:
    # such characters occur only inside JSON strings, where the escape means the same
    return f"\\u{ord(match.group()):04x}"


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
    """Writes a run's stream chunks to standard output: their bytes, each followed by
    ``separator`` (``b""``: the stream's bytes as they are), or JSON lines.

    A JSON line is ``{"seq": n, "data": text}``, or ``"data_base64"`` for bytes that are not
    UTF-8. Call :meth:`finish` at the end.
    """

    def __init__(self, as_json: bool, separator: bytes = b"") -> None:
        self._as_json = as_json
        self._separator = separator
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
        elif framed := chunk.data + self._separator:
            self._output.write(framed)
            self._last = framed[-1:]
        self._output.flush()

    def finish(self) -> None:
        """End a terminal's last line if the stream did not; a file gets the bytes as they are."""
        if not self._as_json and self._last != b"\n" and sys.stdout.isatty():
            self._output.write(b"\n")
        self._output.flush()


@dataclass(frozen=True, slots=True)
class StatusView:
    """What ``registry status`` shows, as far as the role may read it (``None``: not read)."""

    schema: SchemaStatus
    #: which parts the role may read: ``schema`` (alembic_version), ``runs`` (the tables)
    visible: dict[str, bool]
    runs: dict[str, int] | None
    decisions: dict[str, int] | None


def status_json(location: DatabaseLocation, status: StatusView) -> dict[str, Any]:
    """``registry status --json``: where the database is, its server, schema and counts."""
    version = status.schema.server_version_num
    return {
        "database": location.display_url,
        "source": location.source.value,
        "data_dir": None if location.data_dir is None else str(location.data_dir),
        "server_version": f"{version // 10000}.{version % 10000}",
        "server_version_num": version,
        "schema_revision": status.schema.revision,
        "head_revision": status.schema.head,
        "schema_ready": status.schema.ready if status.visible["schema"] else None,
        "runs": status.runs,
        "decisions": status.decisions,
    }


def status_view(location: DatabaseLocation, status: StatusView) -> list[Table]:
    """``registry status`` for people: an overview, then runs and decisions per status."""
    schema, version = status.schema, status.schema.server_version_num
    where = location.display_url
    if location.source is DatabaseSource.EMBEDDED:
        where += f"  (embedded; data in {location.data_dir})"
    elif location.source is DatabaseSource.ENVIRONMENT:
        where += f"  (from ${DATABASE_URL_VARIABLE})"
    overview = overview_grid()
    overview.add_row("database", literal(where))
    overview.add_row("server", literal(f"PostgreSQL {version // 10000}.{version % 10000}"))
    if status.visible["schema"]:
        state = "up to date" if schema.ready else "behind: run `registry migrate`"
        overview.add_row(
            "schema", literal(f"{schema.revision or 'none'} (head {schema.head}): {state}")
        )
    else:
        overview.add_row("schema", literal(f"not visible to this role (head {schema.head})"))
    if not status.visible["runs"]:
        overview.add_row("runs", literal("not visible to this role"))
    tables = [overview]
    for kind, counts in (("runs", status.runs), ("decisions", status.decisions)):
        if counts is not None:
            tables.append(counts_table(kind, counts))
    return tables
