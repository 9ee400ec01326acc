"""An app's lifespan with a registry: connect, continue this process's runs, adopt orphans
periodically, close; for Starlette and FastAPI (``FastAPI(lifespan=RegistryLifespan(url))``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from registry import (
    InvalidInputError,
    RegistryClosedError,
    RegistrySettings,
    RunHandle,
    RunRegistry,
)

logger = logging.getLogger(__name__)

#: ``carry_on(runs, handle)``: continue a run this process resumed or adopted
CarryOn = Callable[[RunRegistry, RunHandle], Coroutine[Any, Any, None]]


class RegistryLifespan:
    """An app's lifespan: connect the registry, continue this process's runs, adopt orphans,
    close.

    On start: ``RunRegistry.connect`` (``url``, or the URL ``url()`` returns), stored as
    ``app.state.run_registry``; ``carry_on(runs, handle)`` spawned for each run
    ``resume_owned_runs`` returns, then for each ``adopt_orphaned_runs`` returns, every
    ``adopt_interval`` seconds, in a supervised task (a failed adoption is logged and tried
    again). On shutdown: the adopter stops, the registry closes (the runs stay active, their
    leases released, for another server to adopt at once), then the run tasks still going are
    cancelled and awaited. :meth:`spawn` runs the app's own run bodies under the same care.
    """

    def __init__(
        self,
        url: str | Callable[[], Awaitable[str]],
        *,
        carry_on: CarryOn | None = None,
        adopt_interval: float = 5.0,
        worker_id: str | None = None,
        settings: RegistrySettings | None = None,
    ) -> None:
        if adopt_interval <= 0:
            raise InvalidInputError("adopt_interval", "must be > 0 seconds")
        self._url = url
        self._carry_on = carry_on
        self._adopt_interval = adopt_interval
        self._worker_id = worker_id
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, body: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``body`` as a task kept until it ends (and cancelled at shutdown); an exception
        it raises is logged."""
        task = asyncio.create_task(body)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a run task failed", exc_info=task.exception())

    def _continue(self, runs: RunRegistry, handles: list[RunHandle]) -> None:
        if self._carry_on is None:
            return
        for handle in handles:
            self.spawn(self._carry_on(runs, handle))

    async def _adopt(self, runs: RunRegistry) -> None:
        while True:
            await asyncio.sleep(self._adopt_interval)
            try:
                self._continue(runs, await runs.adopt_orphaned_runs())
            except RegistryClosedError:
                return
            except Exception:
                # supervised: a database outage (or a carry_on that cannot start) is logged,
                # and the next round tries again
                logger.warning("adopting orphaned runs failed; trying again", exc_info=True)

    @asynccontextmanager
    async def __call__(self, app: Any) -> AsyncIterator[None]:
        url = self._url if isinstance(self._url, str) else await self._url()
        async with RunRegistry.connect(
            url, worker_id=self._worker_id, settings=self._settings
        ) as runs:
            app.state.run_registry = runs
            self._continue(runs, await runs.resume_owned_runs())
            adopter = asyncio.create_task(self._adopt(runs), name="registry-adopt")
            try:
                yield
            finally:
                adopter.cancel()
                await asyncio.gather(adopter, return_exceptions=True)
                await runs.close()
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
