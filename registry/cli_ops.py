"""The ``registry`` commands for operators and deployments: ``check`` (a health probe) and
``alembic-ini`` (what the ``alembic`` command needs to run the packaged migrations).

:mod:`registry.cli` adds them to its group; what they share with the other commands (options,
exit codes, finding the database) comes from :mod:`registry.cli_base`.
"""

from __future__ import annotations

import click

from registry.cli_base import (
    EXIT_FAILED,
    EXIT_OK,
    MAX_CONNECT_TIMEOUT,
    FiniteFloatRange,
    async_command,
    database_option,
    json_option,
    locate,
    options,
)
from registry.console import print_json, printable
from registry.distribution import DISTRIBUTION, installed_version
from registry.health import check_health
from registry.schema import migrations_directory


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
