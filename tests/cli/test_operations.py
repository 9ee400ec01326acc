"""The commands operators and deployments use: version, health, Alembic set-up, logging."""

from __future__ import annotations

from importlib import metadata

from registry.distribution import DISTRIBUTION
from tests.cli.runner import registry


async def test_version_names_the_distribution() -> None:
    result = await registry("--version")
    assert result.code == 0, str(result)
    assert result.stdout == f"{DISTRIBUTION} {metadata.version(DISTRIBUTION)}\n"
