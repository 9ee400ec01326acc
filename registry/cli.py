"""The ``registry`` command line: choose a database, inspect and steer runs, audit, demo.

Every command that needs a database takes ``--database-url`` (or ``REGISTRY_DATABASE_URL``);
without either it uses the embedded PostgreSQL (see :mod:`registry.locate`). Exit codes: 0
done, 1 not found, refused or failed, 2 usage (bad options or bad input, such as a malformed
decision or URL, a number out of range, an argument that is not UTF-8). Errors are one line on
stderr, never a traceback, whatever the input or the stored text; what tables print from the
database is shown literally (see :func:`registry.console.literal`). This module holds the
group, the entry point and the commands only: what they share (options, messages, logging,
connecting) is in :mod:`registry.cli_base`, what they print is built in
:mod:`registry.console`, and they reach the database only through :class:`RunRegistry` and
:mod:`registry.schema`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import click
from alembic import command as alembic_command
from click.exceptions import NoArgsIsHelpError
from rich.console import RenderableType

from registry import demo
from registry.cli_base import (
    DEFAULT_CONNECT_TIMEOUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    MAX_CONNECT_TIMEOUT,
    CommandError,
    FiniteFloatRange,
    Options,
    answering,
    async_command,
    cause,
    configure_logging,
    connected_inspector,
    connected_registry,
    count_range,
    database_option,
    fail,
    json_option,
    locate,
    note,
    one_line,
    options,
    parsed_by,
    read_schema_status,
    read_status,
    silence_stdout,
    unusable_argument,
)
from registry.cli_ops import (
    MAX_WATCH_INTERVAL,
    alembic_ini_command,
    check_command,
    doctor_command,
    watch,
)
from registry.cli_streams import prune_command, tail_command
from registry.console import (
    audit_table,
    decisions_table,
    embedded_json,
    embedded_overview,
    output_console,
    parse_decisions,
    parse_since,
    print_json,
    printable,
    run_json,
    run_overview,
    runs_table,
    status_json,
    status_view,
    write_csv,
)
from registry.database import UNREACHABLE, driver_error
from registry.distribution import DISTRIBUTION, installed_version
from registry.embedded import embedded_status, stop_embedded
from registry.errors import DatabaseError, InvalidInputError, RegistryError
from registry.locate import (
    DATABASE_URL_VARIABLE,
    EMBEDDED_DATABASE,
    DatabaseLocation,
    embedded_data_dir,
    ensure_embedded,
)
from registry.models import RunRecord, RunStatus
from registry.registry import RunRegistry
from registry.schema import alembic_config, check_revision, migrate
from registry.urls import schema_of

_log = logging.getLogger(__name__)


# --- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (also the console script).

    Never a traceback: an error the commands expect is one line on stderr and exit 1 or 2; any
    other exception is one line too (``internal error: ...``, exit 1), its traceback logged
    at debug level (``-vv``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    for index, arg in enumerate(args, start=1):
        problem = unusable_argument(arg)
        if problem is not None:
            fail(f"argument {index} ({arg!r}) {problem}")
            return EXIT_USAGE
    try:
        result = cli.main(args=args, prog_name="registry", standalone_mode=False)
    except click.UsageError as exc:
        if isinstance(exc, NoArgsIsHelpError) and exc.ctx is not None:
            click.echo(exc.ctx.get_help(), err=True)  # a group without its command
            return EXIT_USAGE
        where = exc.ctx.command_path if exc.ctx is not None else "registry"
        fail(f"{one_line(exc.format_message())} (see '{where} --help')")
        return EXIT_USAGE
    except click.ClickException as exc:
        fail(exc.format_message())
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except InvalidInputError as exc:
        fail(str(exc))
        return EXIT_USAGE
    except RegistryError as exc:
        fail(str(exc))
        return EXIT_FAILED
    except BrokenPipeError:
        # the reader went away (``registry audit --format csv | head``): nobody to tell
        silence_stdout()
        return EXIT_FAILED
    except Exception as exc:
        # the last line of defence: a driver error the library let through is still one line,
        # and so is anything else, a bug included
        if driver_error(exc) is not None or isinstance(exc, UNREACHABLE):
            fail(f"database error: {cause(exc)}")
            return EXIT_FAILED
        _log.debug("internal error", exc_info=True)
        message = one_line(str(exc))
        fail(f"internal error: {type(exc).__name__}" + (f": {message}" if message else ""))
        return EXIT_FAILED
    return result if isinstance(result, int) else EXIT_OK


# --- the group and shared options -----------------------------------------------------------------


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    invoke_without_command=True,
)
@click.version_option(
    installed_version(), prog_name="registry", message=f"{DISTRIBUTION} %(version)s"
)
@database_option
@click.option(
    "--connect-timeout",
    type=FiniteFloatRange(min=0.1, max=MAX_CONNECT_TIMEOUT),
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
    configure_logging(verbose)
    ctx.obj = Options(database_url=database_url, connect_timeout=connect_timeout)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


# --- migrate and status ---------------------------------------------------------------------------


@cli.command("migrate")
@database_option
@click.option(
    "--sql", is_flag=True, help="Print the DDL (Alembic offline mode) instead; needs no database."
)
@async_command
async def migrate_command(database_url: str | None, sql: bool) -> None:
    """Upgrade the database schema to the newest revision.

    Safe to run again, and from several places at once. Run it as the schema's owner.
    """
    if sql:
        config = alembic_config()
        if database_url is not None:  # only its schema parameter matters here
            config.attributes["schema"] = schema_of(database_url)
        alembic_command.upgrade(config, "head", sql=True)
        return
    location = await locate(database_url)
    # read the revision first: it also tells an unreachable server within the connect timeout
    before = await read_schema_status(location)
    await migrate(location.url)
    head, where = before.head, location.display_url
    if before.ready:
        click.echo(f"schema already at {head} (head) in {printable(where)}")
    else:
        click.echo(
            f"schema migrated from {before.revision or 'empty'} to {head} in {printable(where)}"
        )


@cli.command("status")
@database_option
@json_option
@async_command
async def status_command(database_url: str | None, as_json: bool) -> int:
    """Server version, schema revision against head, and runs and decisions by status.

    Exit 1 when the schema is behind this version's head (run `registry migrate`).
    """
    location = await locate(database_url)
    status = await read_status(location)
    if as_json:
        print_json(status_json(location, status))
    else:
        console = output_console()
        for renderable in status_view(location, status):
            console.print(renderable)
    behind = status.visible["schema"] and not status.schema.ready
    return EXIT_FAILED if behind else EXIT_OK


# --- runs -----------------------------------------------------------------------------------------


@cli.command("runs")
@database_option
@click.option("--thread", "thread_id", metavar="THREAD", help="Only runs of this thread.")
@click.option("--agent", "agent_id", metavar="AGENT", help="Only runs of this agent.")
@click.option(
    "--status", type=click.Choice([status.value for status in RunStatus]), help="Only this status."
)
@click.option("--limit", type=count_range(1), default=50, show_default=True, help="At most N runs.")
@click.option("--watch", "watching", is_flag=True, help="Redraw the table until Ctrl-C.")
@click.option(
    "--interval",
    type=FiniteFloatRange(min=0, min_open=True, max=MAX_WATCH_INTERVAL),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between redraws with --watch.",
)
@click.option("--count", type=count_range(1), metavar="N", help="With --watch, stop after N draws.")
@json_option
def runs_command(
    database_url: str | None,
    thread_id: str | None,
    agent_id: str | None,
    status: str | None,
    limit: int,
    watching: bool,
    interval: float,
    count: int | None,
    as_json: bool,
) -> int:
    """List runs, newest first: active ones and history.

    With --watch, read and redraw them every --interval seconds until Ctrl-C (exit 0); on a
    terminal each draw replaces the last, elsewhere draws are separated by a blank line.
    """
    if watching and as_json:
        raise click.UsageError("--watch draws a table, not --json")
    if count is not None and not watching:
        raise click.UsageError("--count goes with --watch")

    async def read(registry: RunRegistry) -> list[RunRecord]:
        return await registry.list_runs(
            thread_id=thread_id,
            agent_id=agent_id,
            status=None if status is None else RunStatus(status),
            limit=limit,
        )

    async def table(registry: RunRegistry) -> RenderableType:
        return _runs_view(await read(registry))

    if watching:
        return watch(database_url, table, interval=interval, count=count)
    return asyncio.run(_print_runs(database_url, read, as_json))


async def _print_runs(
    database_url: str | None,
    read: Callable[[RunRegistry], Awaitable[list[RunRecord]]],
    as_json: bool,
) -> int:
    location = await locate(database_url)
    async with connected_registry(location) as registry:
        records = await read(registry)
    if as_json:
        print_json([run_json(record) for record in records])
    else:
        output_console().print(_runs_view(records))
    return EXIT_OK


def _runs_view(records: list[RunRecord]) -> RenderableType:
    return runs_table(records) if records else "no runs match"


@cli.group("run")
def run_group() -> None:
    """One run."""


@run_group.command("show")
@database_option
@click.argument("run_id", metavar="RUN")
@json_option
@async_command
async def run_show_command(database_url: str | None, run_id: str, as_json: bool) -> None:
    """The run, its decisions and its stream length."""
    location = await locate(database_url)
    async with connected_registry(location) as registry:
        details = await registry.run_details(run_id)
        if details is None:
            raise CommandError(f"no run {run_id!r}")
        decisions = await registry.decisions_of_run(run_id)
    stored, last = details.pop("stored_chunks"), details.pop("stream_seq")
    if as_json:
        stream = {"chunks": int(stored), "last_seq": last}
        print_json({"run": details, "decisions": decisions, "stream": stream})
        return
    console = output_console()
    console.print(run_overview(details, stored_chunks=stored, stream_seq=last))
    console.print(decisions_table(decisions))


# --- forward and cancel ---------------------------------------------------------------------------


@cli.command("forward")
@database_option
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
@json_option
@async_command
async def forward_command(
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
    location = await locate(database_url)
    async with connected_registry(location) as registry:
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
        run, thread = forwarded.run_id, forwarded.thread_id
        print_json({"run_id": run, "thread_id": thread, "decisions": len(decisions)})
        return
    noun = "decision" if len(decisions) == 1 else "decisions"
    click.echo(
        f"forwarded {len(decisions)} {noun} to run {printable(forwarded.run_id)} "
        f"(thread {printable(forwarded.thread_id)})"
    )


@cli.command("cancel")
@database_option
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--thread", "thread_id", metavar="THREAD", help="Cancel the thread's active run.")
@async_command
async def cancel_command(
    database_url: str | None, run_id: str | None, thread_id: str | None
) -> None:
    """Request cancellation of an active run, by RUN or by --thread.

    The run's cancellation token trips wherever it lives; the run finishes itself. Exit 1 if
    there is no such active run.
    """
    if (run_id is None) == (thread_id is None):
        raise click.UsageError("give either RUN or --thread THREAD")
    location = await locate(database_url)
    async with connected_registry(location) as registry:
        if run_id is not None:
            cancelled = run_id if await registry.cancel_active_run_by_id(run_id) else None
            missing = f"run {run_id!r} is not active"
        else:
            assert thread_id is not None
            cancelled = await registry.cancel_active_run_by_thread(thread_id)
            missing = f"thread {thread_id!r} has no active run"
    if cancelled is None:
        raise CommandError(f"nothing cancelled: {missing}")
    click.echo(f"cancel requested for run {printable(cancelled)}")


# --- audit ----------------------------------------------------------------------------------------


@cli.command("audit")
@database_option
@click.option("--thread", "thread_id", metavar="THREAD", help="Only decisions of this thread.")
@click.option("--run", "run_id", metavar="RUN", help="Only decisions of this run.")
@click.option("--agent", "agent_id", metavar="AGENT", help="Only decisions of this agent.")
@click.option(
    "--since",
    callback=parsed_by(parse_since),
    metavar="TIME",
    help="Only decisions received since TIME: a duration ago (2h, 7d) or ISO 8601 (local).",
)
@click.option("--limit", type=count_range(1), metavar="N", help="Only the newest N.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="json and csv give every column of the view, latencies in seconds.",
)
@async_command
async def audit_command(
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
    location = await locate(database_url)
    # the view only: what the auditing role may read (no schema check, no secret)
    async with connected_inspector(location) as inspector, answering(location):
        try:
            rows = await inspector.audit_trail(
                run_id=run_id, thread_id=thread_id, agent_id=agent_id, since=since, limit=limit
            )
        except DatabaseError as exc:
            if exc.sqlstate == "42P01":  # no decision_audit view: say which migration is due
                check_revision(await inspector.schema_revision())
            raise
    if output_format == "json":
        print_json(rows)
    elif output_format == "csv":
        write_csv(rows)
    elif rows:
        output_console().print(audit_table(rows))
    else:
        output_console().print("no decisions match")


# --- the embedded server --------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The embedded PostgreSQL used when no database URL is given.

    It keeps its data under the user's data directory ($REGISTRY_DATA_DIR overrides it) and
    keeps running between commands until `registry db stop`. For development and demos only.
    """


@db_group.command("start")
@async_command
async def db_start_command() -> None:
    """Start the embedded server (if needed), create and migrate its database; print the URL."""
    location = await ensure_embedded()
    state = "started" if location.started else "already running"
    note(f"embedded PostgreSQL {state} (data in {location.data_dir})")
    click.echo(location.url)


@db_group.command("url")
@async_command
async def db_url_command() -> None:
    """Print the embedded database's URL (starting the server if needed).

    For example: export REGISTRY_DATABASE_URL="$(registry db url)".
    """
    location = await ensure_embedded()
    if location.started:
        note(f"started the embedded PostgreSQL (data in {location.data_dir})")
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
@json_option
def db_status_command(as_json: bool) -> int:
    """Whether the embedded server runs, where its data is, and its URL. Exit 1 if stopped."""
    status = embedded_status(embedded_data_dir(), database=EMBEDDED_DATABASE)
    if as_json:
        print_json(embedded_json(status))
    else:
        output_console().print(embedded_overview(status))
    if options().database_url is None and os.environ.get(DATABASE_URL_VARIABLE, "").strip():
        note(f"${DATABASE_URL_VARIABLE} is set: other commands use it, not this server")
    return EXIT_OK if status.running else EXIT_FAILED


# --- demo -----------------------------------------------------------------------------------------


@cli.command("demo")
@database_option
@async_command
async def demo_command(database_url: str | None) -> int:
    """Watch a run survive its worker being killed (about 10 seconds).

    A worker process streams, suspends on a tool call and is SIGKILLed; the approval is
    forwarded while it is down and another process replays the stream; a restarted worker
    resumes the run, gets the decision once, finishes. Every claim printed is checked; exit
    1 if one fails.
    """

    async def find_database() -> DatabaseLocation:
        return await locate(database_url, quiet=True)  # the demo says which database it uses

    return await demo.run_demo(find_database, connect_timeout=options().connect_timeout)


# --- operations (registry.cli_ops) ---------------------------------------------------------------

cli.add_command(check_command)
cli.add_command(doctor_command)
cli.add_command(alembic_ini_command)

# --- streams (registry.cli_streams) ---------------------------------------------------------------

cli.add_command(tail_command)
cli.add_command(prune_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
