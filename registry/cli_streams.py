"""The ``registry`` commands on runs' streams: ``tail`` prints one, ``prune`` deletes ended ones.

:mod:`registry.cli` adds them to its group; what they share with the other commands (options,
exit codes, connecting) comes from :mod:`registry.cli_base`.
"""

from __future__ import annotations

from datetime import timedelta

import click

from registry.cli_base import (
    CommandError,
    async_command,
    connected_registry,
    count_range,
    database_option,
    json_option,
    locate,
    parsed_by,
)
from registry.console import ChunkWriter, format_duration, parse_duration

#: chunks read per query when printing a stored stream
_READ_BATCH = 1000


@click.command("tail")
@database_option
@click.argument("run_id", metavar="RUN")
@click.option(
    "--from",
    "from_seq",
    type=count_range(1),
    default=1,
    show_default=True,
    metavar="SEQ",
    help="First chunk to print.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing live chunks until the run ends.")
@click.option(
    "--separator",
    metavar="TEXT",
    help="Written after each chunk's bytes; '' for the stream as it is.  [default: newline]",
)
@json_option
@async_command
async def tail_command(
    database_url: str | None,
    run_id: str,
    from_seq: int,
    follow: bool,
    separator: str | None,
    as_json: bool,
) -> None:
    """Print a run's stream: each chunk's bytes and a newline (--separator), or JSON lines
    with --json.

    With --follow, waits for new chunks and returns once the run has ended. Exit 1 if the run
    does not exist or has no stream (never opened, or pruned).
    """
    if as_json and separator is not None:
        raise click.UsageError("--separator goes with bytes, not with --json")
    location = await locate(database_url)
    writer = ChunkWriter(as_json, ("\n" if separator is None else separator).encode())
    async with connected_registry(location, listen=follow) as registry:
        details = await registry.run_details(run_id)
        if details is None:
            raise CommandError(f"no run {run_id!r}")
        if details["stream_seq"] is None:
            raise CommandError(f"run {run_id!r} has no stream (never opened, or pruned)")
        if not follow:
            after = from_seq - 1
            while chunks := await registry.read_chunks(run_id, after=after, limit=_READ_BATCH):
                for chunk in chunks:
                    writer.write(chunk)
                after = chunks[-1].seq
            writer.finish()
            return
        subscription = await registry.subscribe_thread_run_stream(run_id, after_seq=from_seq - 1)
        if subscription is None:
            raise CommandError(f"run {run_id!r} has no stream (pruned)")
        async with subscription:
            try:
                async for chunk in subscription:
                    writer.write(chunk)
            finally:
                writer.finish()


@click.command("prune")
@database_option
@click.option(
    "--older-than",
    "older_than",
    callback=parsed_by(parse_duration),
    required=True,
    metavar="DURATION",
    help="Runs that ended longer ago than this: 7d, 12h, 30m, 1h30m.",
)
@async_command
async def prune_command(database_url: str | None, older_than: timedelta) -> None:
    """Delete the stream chunks of runs that ended more than DURATION ago.

    Never touches active runs, and never decisions (the audit trail).
    """
    location = await locate(database_url)
    async with connected_registry(location) as registry:
        deleted = await registry.prune(older_than)
    click.echo(
        f"deleted {deleted} stream chunks of runs that ended more than "
        f"{format_duration(older_than)} ago"
    )
