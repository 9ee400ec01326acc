"""The ``registry.testing`` plugin in a user's own project: a small project written into a
temporary directory and run by ``python -m pytest`` in a subprocess, once per way of running
async tests (pytest-asyncio strict and auto, anyio with and without pytest-asyncio), and with
each misconfiguration a user may make.

The projects reuse this session's server through ``REGISTRY_TEST_DATABASE_URL``, so no
subprocess starts a PostgreSQL of its own.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.testing import TestServer

#: how long one project's pytest run may take (it imports SQLAlchemy and migrates a template)
DEADLINE = 60.0

CONFTEST = """\
import os
import sys

import pytest

if os.environ.get("HIDE_TESTCONTAINERS"):
    sys.modules["testcontainers"] = None  # as if it were not installed

pytest_plugins = ["registry.testing"]


@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

#: the README's snippet, with MARK standing for each mode's marker
TESTS = """\
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

MARK
async def test_run_registry(run_registry):
    await run_registry.register("run-1", "agent", "thread-1")
    assert await run_registry.active_run_id_for_thread("agent", "thread-1") == "run-1"


MARK
async def test_own_engine(registry_database):
    assert registry_database.name.startswith(PREFIX + "_")
    engine = create_async_engine(registry_database.sqlalchemy_url)
    try:
        async with engine.connect() as connection:
            runs = await connection.execute(text("SELECT count(*) FROM registry.runs"))
            assert runs.scalar() == 0
    finally:
        await engine.dispose()


def test_a_plain_test_gets_the_plain_url(registry_database_url):
    assert registry_database_url.startswith("postgresql://")
"""


@dataclass(frozen=True)
class Mode:
    """One way a project runs async tests."""

    name: str
    marker: str
    ini: str
    args: tuple[str, ...] = ()


LOOP_SCOPE = "asyncio_default_fixture_loop_scope = function\n"
MODES = [
    Mode("strict", "@pytest.mark.asyncio", LOOP_SCOPE),
    Mode("auto", "", "asyncio_mode = auto\n" + LOOP_SCOPE),
    Mode("anyio", "@pytest.mark.anyio", LOOP_SCOPE),
    # what FastAPI and Starlette document: anyio's plugin, no pytest-asyncio
    Mode("anyio-alone", "@pytest.mark.anyio", "", ("-p", "no:asyncio")),
]


@dataclass(frozen=True)
class Outcome:
    code: int
    output: str

    def __str__(self) -> str:
        return f"exit {self.code}\n{self.output[-4000:]}"


def write_project(root: Path, mode: Mode, *, prefix: str, expected: str = "") -> Path:
    """The project: ``prefix`` in its ``pytest.ini``, a test that its databases' names start
    with ``expected`` (default: ``prefix``)."""
    root.mkdir()
    ini = f"[pytest]\nfilterwarnings = error\nregistry_test_database_prefix = {prefix}\n"
    (root / "pytest.ini").write_text(ini + mode.ini)
    (root / "conftest.py").write_text(CONFTEST)
    tests = TESTS.replace("MARK\n", f"{mode.marker}\n" if mode.marker else "")
    (root / "test_app.py").write_text(tests.replace("PREFIX", repr(expected or prefix)))
    return root


async def run_pytest(root: Path, env: dict[str, str], *args: str) -> Outcome:
    """``python -m pytest`` in ``root`` with this interpreter (the plugin comes from the
    editable install), to its end or the deadline."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *args,
        cwd=root,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), DEADLINE)
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise AssertionError(f"pytest in {root} ran longer than {DEADLINE} s") from None
    assert process.returncode is not None
    return Outcome(process.returncode, output.decode("utf-8", "replace"))


def project_environment(**settings: str) -> dict[str, str]:
    """This environment without the registry's test settings and pytest's own, plus
    ``settings``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REGISTRY_", "PYTEST_"))
    }
    env.update(settings)
    return env


async def test_the_plugin_works_in_every_async_mode(
    registry_server: TestServer, tmp_path: Path
) -> None:
    env = project_environment(
        REGISTRY_TEST_BACKEND="url", REGISTRY_TEST_DATABASE_URL=registry_server.admin_url
    )

    def variable(mode: str) -> dict[str, str]:
        prefix = prefixed.get(mode)
        return {} if prefix is None else {"REGISTRY_TEST_DATABASE_PREFIX": prefix}

    # the ini option names the databases; in one project the environment variable wins
    prefixed = {"auto": "from_env"}
    projects = [
        write_project(
            tmp_path / mode.name, mode, prefix="from_ini", expected=prefixed.get(mode.name, "")
        )
        for mode in MODES
    ]
    outcomes = await asyncio.gather(
        *(
            run_pytest(root, env | variable(mode.name), *mode.args)
            for root, mode in zip(projects, MODES, strict=True)
        )
    )
    for mode, outcome in zip(MODES, outcomes, strict=True):
        assert outcome.code == 0, f"{mode.name}: {outcome}"
        assert "3 passed" in outcome.output, f"{mode.name}: {outcome}"
        assert "tests ran against the url PostgreSQL" in outcome.output, f"{mode.name}: {outcome}"


def assert_usage_error(outcome: Outcome, fragment: str) -> None:
    """pytest stopped with exit 4 on one ``ERROR:`` line holding ``fragment``, no traceback,
    and claimed to have run nothing against a server."""
    assert outcome.code == 4, str(outcome)
    errors = [line for line in outcome.output.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, str(outcome)
    assert fragment in errors[0], str(outcome)
    assert "Traceback" not in outcome.output, str(outcome)
    assert "tests ran against" not in outcome.output, str(outcome)


#: what a user may get wrong, and what the one line then says
MISCONFIGURATIONS = [
    (
        {"REGISTRY_TEST_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"},
        "REGISTRY_TEST_DATABASE_URL (postgresql://postgres@127.0.0.1:1/test) does not answer",
    ),
    (
        {"REGISTRY_TEST_BACKEND": "container", "HIDE_TESTCONTAINERS": "1"},
        "REGISTRY_TEST_BACKEND=container needs testcontainers",
    ),
    (
        {"REGISTRY_TEST_BACKEND": "docker"},
        "REGISTRY_TEST_BACKEND='docker': use url, container or embedded",
    ),
    (
        {"REGISTRY_TEST_BACKEND": "url"},
        "REGISTRY_TEST_BACKEND=url needs REGISTRY_TEST_DATABASE_URL",
    ),
    (
        {"REGISTRY_TEST_DATABASE_URL": "mysql://root@127.0.0.1/test"},
        "REGISTRY_TEST_DATABASE_URL: not a PostgreSQL URL",
    ),
    ({"REGISTRY_TEST_DATABASE_PREFIX": "Bad-Prefix"}, "test database prefix 'Bad-Prefix'"),
]


async def test_a_misconfiguration_is_one_line(tmp_path: Path) -> None:
    root = write_project(tmp_path / "project", MODES[1], prefix="registry_test")
    outcomes = await asyncio.gather(
        *(run_pytest(root, project_environment(**settings)) for settings, _ in MISCONFIGURATIONS)
    )
    for (_, fragment), outcome in zip(MISCONFIGURATIONS, outcomes, strict=True):
        assert_usage_error(outcome, fragment)


@pytest.mark.slow
async def test_the_embedded_server_leaves_no_temporary_directory(tmp_path: Path) -> None:
    root = write_project(tmp_path / "project", MODES[0], prefix="registry_test")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = project_environment(REGISTRY_TEST_BACKEND="embedded", TMPDIR=str(temporary))
    outcome = await run_pytest(root, env)
    assert outcome.code == 0, str(outcome)
    assert "tests ran against the embedded PostgreSQL" in outcome.output, str(outcome)
    assert not list(temporary.glob("regpg*")), str(outcome)
