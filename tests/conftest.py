"""Shared fixtures: the ``registry.testing`` plugin plus suite-wide hygiene."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest_plugins = ["registry.testing"]


@pytest.fixture(autouse=True)
async def _fail_on_unobserved_loop_errors() -> AsyncIterator[None]:
    """Fail a test if an exception reached the event loop's handler unobserved."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    loop.set_exception_handler(previous)
    assert not errors, f"unobserved errors in the event loop: {errors}"


@pytest.fixture(autouse=True, scope="module")
def _collect_leaks_per_module() -> Iterator[None]:
    """Finalize each module's garbage before the next module starts.

    An unclosed socket or pipe warns only when the collector finalizes it, which can be in
    any later test; collecting here pins such a leak to its own module, on every machine.
    """
    yield
    gc.collect()
