"""The ``registry`` commands for operators and deployments: ``check`` (a health probe),
``doctor`` (state left stranded) and ``alembic-ini`` (what the ``alembic`` command needs to
run the packaged migrations), and :func:`watch`, the loop behind ``runs --watch``.

:mod:`registry.cli` adds them to its group; what they share with the other commands (options,
exit codes, finding the database) comes from :mod:`registry.cli_base`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import click
from rich.console import RenderableType

from registry.cli_base import (
    EXIT_FAILED,
    EXIT_OK,
    MAX_CONNECT_TIMEOUT,
    FiniteFloatRange,
    async_command,
    connected_registry,
    database_option,
    json_option,
    locate,
    options,
    parsed_by,
)
from registry.console import (
    format_duration,
    output_console,
    parse_duration,
    print_json,
    printable,
)
from registry.distribution import DISTRIBUTION, installed_version
from registry.doctor import Finding, Thresholds, diagnose
from registry.health import check_health
from registry.registry import RunRegistry
from registry.schema import migrations_directory

#: what a terminal is sent before each frame: cursor home, then erase the screen
CLEAR_SCREEN = "\x1b[H\x1b[2J"
#: the longest ``--interval`` of a watch, in seconds (a day)
MAX_WATCH_INTERVAL = 86400.0

#: reads one frame of a watch through the command's registry
Frame = Callable[[RunRegistry], Awaitable[RenderableType]]


def watch(database_url: str | None, frame: Frame, *, interval: float, count: int | None) -> int:
    """Draw ``frame`` every ``interval`` seconds until Ctrl-C, or ``count`` frames: exit 0.

    One registry (one pool) serves every frame. On a terminal the screen is cleared before each
    frame; elsewhere (a pipe, a file) frames follow each other separated by a blank line, with
    no escape codes. Errors end the watch as they would end the one-shot command.
    """
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: how a watch is meant to end
        asyncio.run(_redraw(database_url, frame, interval, count))
    return EXIT_OK


async def _redraw(
    database_url: str | None, frame: Frame, interval: float, count: int | None
) -> None:
    location = await locate(database_url)
    console = output_console()
    drawn = 0
    async with connected_registry(location) as registry:
        while True:
            renderable = await frame(registry)
            if console.is_terminal:
                console.file.write(CLEAR_SCREEN)
            elif drawn:
                console.print()
            console.print(renderable)
            console.file.flush()
            drawn += 1
            if count is not None and drawn >= count:
                return
            await asyncio.sleep(interval)


@click.command("check")
@database_option
@click.option(
    "--timeout",
    "seconds",
    type=FiniteFloatRange(min=0.1, max=MAX_CONNECT_TIMEOUT),
    metavar="SECONDS",
    help="Time each check has  [default: --connect-timeout]",
)
@json_option
@async_command
async def check_command(database_url: str | None, seconds: float | None, as_json: bool) -> int:
    """Check the database: exit 0 when healthy, 1 otherwise (for probes and scripts).

    One line per check: the server answers; the schema is at this version's head; LISTEN/NOTIFY
    works (a connection LISTENs, NOTIFYs itself and receives it within the timeout).
    """
    location = await locate(database_url)
    checks = await check_health(location.url, seconds=seconds or options().connect_timeout)
    healthy = all(check.ok for check in checks)
    if as_json:
        print_json(
            {
                "database": location.display_url,
                "healthy": healthy,
                "checks": [
                    {"name": check.name, "ok": check.ok, "detail": check.detail} for check in checks
                ],
            }
        )
    else:
        for check in checks:
            detail = check.detail
            if check.name == "server":
                detail += f" ({location.display_url})"
            click.echo(f"{'ok' if check.ok else 'FAIL':<4}  {check.name:<8}  {printable(detail)}")
    return EXIT_OK if healthy else EXIT_FAILED


_DEFAULTS = Thresholds()


def _threshold(
    name: str, default: timedelta, what: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        f"--{name}",
        name.replace("-", "_"),
        callback=parsed_by(parse_duration),
        default=format_duration(default),
        show_default=True,
        metavar="DURATION",
        help=what,
    )


@click.command("doctor")
@database_option
@_threshold("lease-grace", _DEFAULTS.lease_grace, "An active run's lease expired this long ago.")
@_threshold("cancel-grace", _DEFAULTS.cancel_grace, "A cancel was requested this long ago.")
@_threshold("ack-grace", _DEFAULTS.ack_grace, "A decision was delivered this long ago.")
@_threshold("retention", _DEFAULTS.retention, "A run ended this long ago, stream kept.")
@json_option
@async_command
async def doctor_command(
    database_url: str | None,
    lease_grace: timedelta,
    cancel_grace: timedelta,
    ack_grace: timedelta,
    retention: timedelta,
    as_json: bool,
) -> int:
    """Find state left stranded: exit 0 when there is none, 1 otherwise.

    One line per invariant, with a count, the oldest offenders and the fix: active runs whose
    lease expired long ago (no live owner), cancels requested long ago on runs still active,
    decisions delivered long ago and never acknowledged, streams of runs that ended long ago.
    Read-only.
    """
    location = await locate(database_url)
    thresholds = Thresholds(lease_grace, cancel_grace, ack_grace, retention)
    findings = await diagnose(location.url, thresholds, connect_timeout=options().connect_timeout)
    if as_json:
        print_json(
            {
                "database": location.display_url,
                "healthy": all(finding.ok for finding in findings),
                "invariants": [
                    {
                        "name": finding.name,
                        "ok": finding.ok,
                        "count": finding.count,
                        "examples": finding.examples,
                        "fix": None if finding.ok else finding.fix,
                    }
                    for finding in findings
                ],
            }
        )
    else:
        for finding in findings:
            click.echo(printable(_finding_line(finding)))
    return EXIT_OK if all(finding.ok for finding in findings) else EXIT_FAILED


def _finding_line(finding: Finding) -> str:
    state = "ok" if finding.ok else "FAIL"
    line = f"{state:<4}  {finding.name}: {finding.count} {finding.description}"
    if finding.ok:
        return line
    more = ", ..." if finding.count > len(finding.examples) else ""
    return f"{line} (e.g. {', '.join(finding.examples)}{more}); fix: {finding.fix}"


@click.command("alembic-ini")
def alembic_ini_command() -> None:
    """Print an alembic.ini that runs the installed package's migrations.

    For deployments that run Alembic themselves: `registry alembic-ini > alembic.ini`, then
    `alembic -x url=postgresql://... upgrade head` (or set $REGISTRY_DATABASE_URL). The path is
    this installation's: print the file again after installing elsewhere.
    """
    click.echo(
        f"# Alembic settings for the migrations of {DISTRIBUTION} {installed_version()}, "
        "written by `registry alembic-ini`.\n"
        "# The database: alembic -x url=postgresql://... upgrade head, "
        "else $REGISTRY_DATABASE_URL, else sqlalchemy.url below.\n"
        "[alembic]\n"
        f"script_location = {str(migrations_directory()).replace('%', '%%')}\n"
        "path_separator = os\n"
        "sqlalchemy.url =\n"
    )
