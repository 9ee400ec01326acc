"""Shared fixtures: the ``registry.testing`` plugin plus suite-wide hygiene."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
