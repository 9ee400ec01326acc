"""Schema isolation: every object of the registry lives in its own schema, next to an
application's own tables and Alembic history, and an earlier install in ``public`` moves in."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import registry
from registry import (
    InvalidInputError,
    RegistrySettings,
    RunRegistry,
    SchemaNotReadyError,
    StreamChunk,
    ToolCallDecision,
)
from registry.repository import application_grants
from registry.schema import current_revision, head_revision
from tests.cli.runner import assert_error
from tests.cli.runner import registry as registry_command
from tests.helpers.database import fetch

APP_RUNS = "CREATE TABLE public.runs (id serial PRIMARY KEY, app_payload text NOT NULL)"


def with_schema(url: str, schema: str) -> str:
    """``url`` with a ``schema`` parameter (a URL to a Unix socket already has a query)."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def _schemas(url: str) -> set[str]:
    rows = await fetch(
        url, "SELECT nspname FROM pg_namespace WHERE nspname !~ '^(pg_|information_schema)'"
    )
    return {row["nspname"] for row in rows}


async def _tables(url: str, schema: str) -> set[str]:
    rows = await fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {row["tablename"] for row in rows}


@pytest.fixture
async def empty_url(registry_database_url: str) -> str:
    """A database without the registry's schema (the test database, emptied)."""
    await fetch(registry_database_url, "DROP SCHEMA registry CASCADE")
    return registry_database_url


@pytest.fixture
async def app_url(empty_url: str) -> str:
    """A database where an application keeps its own Alembic history and ``runs`` table."""
    await fetch(
        empty_url, "CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)"
    )
    await fetch(empty_url, "INSERT INTO public.alembic_version VALUES ('app0001')")
    await fetch(empty_url, APP_RUNS)
    await fetch(empty_url, "INSERT INTO public.runs (app_payload) VALUES ('the app''s row')")
    return empty_url


async def _exercise(url: str, settings: RegistrySettings | None = None) -> None:
    """Register, forward and deliver a decision, publish and read a chunk."""
    async with await RunRegistry.connect(url, settings=settings) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        forwarded = await run_registry.forward_decisions_by_run_id(
            "run-1", [ToolCallDecision.resume("call-1", {"ok": True}, 1)]
        )
        assert forwarded
        inbox = handle.decisions()
        delivery = await asyncio.wait_for(anext(inbox), 5)
        assert delivery.decision.target_id == "call-1"
        assert await inbox.ack(delivery)
        assert await run_registry.bind_thread_run_stream_fanout("run-1")
        subscription = await run_registry.subscribe_thread_run_stream("run-1")
        assert subscription is not None
        assert await handle.publish(b"chunk") == 1
        assert await asyncio.wait_for(anext(subscription), 5) == StreamChunk(1, b"chunk")


async def _app_untouched(url: str) -> None:
    assert [
        row["version_num"] for row in await fetch(url, "SELECT * FROM public.alembic_version")
    ] == ["app0001"]
    rows = await fetch(url, "SELECT id, app_payload FROM public.runs")
    assert rows == [{"id": 1, "app_payload": "the app's row"}]
    assert await _tables(url, "public") == {"alembic_version", "runs"}


async def test_migrate_next_to_an_applications_alembic_history(app_url: str) -> None:
    await registry.migrate(app_url)
    assert await _tables(app_url, "registry") == {
        "alembic_version",
        "runs",
        "decisions",
        "stream_chunks",
        "notification_secrets",
    }
    assert await current_revision(app_url) == head_revision()
    await _exercise(app_url)
    await registry.migrate(app_url)  # idempotent
    await _app_untouched(app_url)
    # the view and the trigger function are ours too
    [row] = await fetch(
        app_url,
        "SELECT to_regclass('registry.decision_audit') IS NOT NULL AS view,"
        " to_regprocedure('registry.decisions_guard()') IS NOT NULL AS guard",
    )
    assert row["view"]
    assert row["guard"]


async def test_cli_status_check_and_migrate_next_to_an_application(app_url: str) -> None:
    url = ("--database-url", app_url)
    before = await registry_command("status", "--json", *url)
    assert before.code == 1, str(before)
    assert before.json()["schema_revision"] is None, "the app's revision is not ours"
    migrated = await registry_command("migrate", *url)
    assert migrated.code == 0, str(migrated)
    assert f"schema migrated from empty to {head_revision()}" in migrated.stdout
    status, check = await asyncio.gather(
        registry_command("status", "--json", *url), registry_command("check", *url)
    )
    assert status.code == 0, str(status)
    assert status.json()["schema_revision"] == head_revision()
    assert check.code == 0, str(check)
    await _app_untouched(app_url)


async def test_a_foreign_revision_in_our_version_table_is_one_line(app_url: str) -> None:
    # pointed at the application's own version table, migrate refuses without a traceback
    with pytest.raises(SchemaNotReadyError, match="app0001"):
        await registry.migrate(app_url, schema="public")
    result = await registry_command("migrate", "--database-url", with_schema(app_url, "public"))
    assert_error(result, 1, "app0001")
    await _app_untouched(app_url)


async def test_an_install_in_public_moves_into_the_schema(empty_url: str) -> None:
    # the layout of earlier versions: every table and the version table in public
    old = RegistrySettings(schema="public")
    await registry.migrate(empty_url, schema="public")
    async with await RunRegistry.connect(empty_url, settings=old) as run_registry:
        await run_registry.register("run-old", "agent-a", "thread-old")
        await run_registry.forward_decisions_by_run_id(
            "run-old", [ToolCallDecision.resume("call-old", None, 1)]
        )
    [secret_before] = await fetch(empty_url, "SELECT secret FROM public.notification_secrets")

    await registry.migrate(empty_url)

    assert await _tables(empty_url, "public") == set()
    assert await current_revision(empty_url) == head_revision()
    [row] = await fetch(empty_url, "SELECT run_id, status FROM registry.runs")
    assert row == {"run_id": "run-old", "status": "active"}
    [secret_after] = await fetch(empty_url, "SELECT secret FROM registry.notification_secrets")
    assert secret_after == secret_before
    async with await RunRegistry.connect(empty_url) as run_registry:
        handle = await run_registry.handle_by_run_id("run-old")
        assert handle is not None
        delivery = await asyncio.wait_for(anext(handle.decisions()), 5)
        assert delivery.decision.target_id == "call-old"
        # the guard trigger moved with its table and still holds
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
            await fetch(empty_url, "UPDATE registry.decisions SET reason = 'rewritten'")
        await run_registry.register("run-new", "agent-a", "thread-new")


async def test_a_schema_set_by_setting(empty_url: str) -> None:
    settings = RegistrySettings(schema="tenant_a")
    await registry.migrate(empty_url, schema="tenant_a")
    assert "registry" not in await _schemas(empty_url)
    await _exercise(empty_url, settings)
    assert [
        row["run_id"] for row in await fetch(empty_url, "SELECT run_id FROM tenant_a.runs")
    ] == ["run-1"]
    # without the setting, the registry looks in its default schema and finds no revision
    with pytest.raises(SchemaNotReadyError):
        await RunRegistry.connect(empty_url)
    with pytest.raises(InvalidInputError, match="schema"):
        await RunRegistry.connect(with_schema(empty_url, "tenant_b"), settings=settings)


async def test_a_schema_set_by_url_parameter(empty_url: str) -> None:
    url = with_schema(empty_url, "select")  # a reserved word: quoted everywhere
    await registry.migrate(url)
    await _exercise(url)
    assert await current_revision(url) == head_revision()
    assert await current_revision(empty_url) is None
    assert await _tables(empty_url, "select") >= {"runs", "decisions", "alembic_version"}


@pytest.mark.parametrize("name", ["Registry", "a-b", 'x"; DROP TABLE runs; --', "", "1abc"])
async def test_a_bad_schema_name_is_refused_and_creates_nothing(empty_url: str, name: str) -> None:
    before = await _schemas(empty_url)
    with pytest.raises(InvalidInputError) as caught:
        await registry.migrate(empty_url, schema=name)
    assert caught.value.field == "schema"
    with pytest.raises(InvalidInputError) as caught:
        RegistrySettings(schema=name)
    assert caught.value.field == "schema"
    with pytest.raises(InvalidInputError, match="schema"):
        application_grants("app", "db", name)
    assert await _schemas(empty_url) == before


async def test_a_bad_schema_in_the_url_or_environment(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await _schemas(empty_url)
    with pytest.raises(InvalidInputError) as caught:
        await registry.migrate(with_schema(empty_url, "No%20Way"))
    assert caught.value.field == "schema"
    monkeypatch.setenv("REGISTRY_SCHEMA", "No-Way")
    with pytest.raises(InvalidInputError) as caught:
        await registry.migrate(empty_url)
    assert caught.value.field == "schema"
    assert await _schemas(empty_url) == before
    result = await registry_command("migrate", "--database-url", with_schema(empty_url, "Bad"))
    assert_error(result, 2, "schema")
    assert await _schemas(empty_url) == before


async def test_the_environment_chooses_the_schema(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_SCHEMA", "from_env")
    await registry.migrate(empty_url)
    await _exercise(empty_url)
    assert "registry" not in await _schemas(empty_url)
    assert await _tables(empty_url, "from_env") >= {"runs", "alembic_version"}
