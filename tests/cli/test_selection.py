"""``resolve_database_url``: the command line's choice of database, for library callers.

The embedded fallback is exercised through the command line in ``test_embedded.py``; these
check the order of the choice in-process, without starting anything.
"""

from __future__ import annotations

import pytest

from registry import DatabaseUnavailableError, InvalidInputError, resolve_database_url
from registry.locate import DatabaseSource, locate_database

GIVEN = "postgresql://app@db.internal/agents"
CONFIGURED = "postgresql+asyncpg://other@db.internal/agents"


@pytest.fixture(autouse=True)
def no_embedded_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # were the embedded server chosen by mistake, it would fail to start here
    monkeypatch.setenv("REGISTRY_DATA_DIR", "/dev/null/no-embedded-server")
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)


async def test_a_given_url_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_DATABASE_URL", CONFIGURED)
    assert await resolve_database_url(GIVEN) == GIVEN
    location = await locate_database(GIVEN)
    assert location.source is DatabaseSource.ARGUMENT


async def test_the_environment_is_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_DATABASE_URL", f"  {CONFIGURED}\n")
    assert await resolve_database_url() == CONFIGURED
    assert (await locate_database()).source is DatabaseSource.ENVIRONMENT


async def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_DATABASE_URL", " ")
    with pytest.raises(DatabaseUnavailableError, match="the embedded PostgreSQL did not start"):
        await resolve_database_url()


@pytest.mark.parametrize(
    ("url", "variable", "field"),
    [
        ("mysql://u@h/db", None, "url"),
        ("", None, "url"),
        (None, "http://example.invalid/", "REGISTRY_DATABASE_URL"),
    ],
)
async def test_unusable_urls_are_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, url: str | None, variable: str | None, field: str
) -> None:
    if variable is not None:
        monkeypatch.setenv("REGISTRY_DATABASE_URL", variable)
    with pytest.raises(InvalidInputError) as caught:
        await resolve_database_url(url)
    assert caught.value.field == field
