"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from registry.testing import TestServer
from tests.helpers.pgbouncer import Pgbouncer, running_pgbouncer


@pytest.fixture(scope="session")
def pgbouncer(registry_server: TestServer) -> Iterator[Pgbouncer]:
    """A pgbouncer in transaction mode (2 server connections per database) in front of the
    session's server, started once; tests that use it skip when none can be had."""
    with running_pgbouncer(registry_server.admin_url) as bouncer:
        yield bouncer
