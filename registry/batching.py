"""Group commit: calls of one kind that arrive together go to the database as one statement.

Every commit that notifies takes one database-wide lock and every synchronous commit waits
for one WAL flush, so a statement per call caps a busy process at what one connection turn
allows. A :class:`Batcher` sends a call at once when fewer than ``concurrency`` statements
are out (no added latency when idle); calls that arrive meanwhile wait and go together in the
next statement. Each call still gets its own answer: the send function returns one result
(or exception) per item, in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

logger = logging.getLogger(__name__)

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

#: What a send function returns for one item: its result, or the exception to raise.
Outcome: TypeAlias = _Result | BaseException


@dataclass(slots=True)
class _Call(Generic[_Item, _Result]):
    item: _Item
    done: asyncio.Future[_Result]


class Batcher(Generic[_Item, _Result]):
    """Sends items in batches through ``send`` (a statement for many), ``concurrency`` at most
    in flight, at most ``max_items`` (and, with ``weight``, about ``max_weight``) each.

    With ``key``, a batch holds at most one item per key and an item waits while an earlier
    one of its key is in flight, so the items of one key are sent in the order submitted
    (one run's appends, say). ``cut_short`` makes the exception for callers whose statement
    was cancelled under them (the registry closing). When ``send`` raises an exception that
    ``split`` accepts (the server refused the statement, say), each item of a batch of
    several is sent again alone, so that only the one at fault gets the error.
    """

    def __init__(
        self,
        send: Callable[[list[_Item]], Awaitable[Sequence[Outcome[_Result]]]],
        *,
        concurrency: int,
        max_items: int,
        cut_short: Callable[[], BaseException],
        key: Callable[[_Item], Hashable] | None = None,
        split: Callable[[Exception], bool] | None = None,
        weight: Callable[[_Item], int] | None = None,
        max_weight: int = 0,
        name: str = "registry-batch",
    ) -> None:
        self._send = send
        self._concurrency = max(1, concurrency)
        self._max_items = max_items
        self._cut_short = cut_short
        self._key = key
        self._split = split
        self._weight = weight
        self._max_weight = max_weight
        self._name = name
        self._queue: collections.deque[_Call[_Item, _Result]] = collections.deque()
        self._busy: set[Hashable] = set()  # keys of items in a statement in flight
        self._statements: set[asyncio.Task[None]] = set()
        # statements sent from their caller's own task (nothing else was waiting): each one's
        # end, for drain()
        self._alone: set[asyncio.Future[None]] = set()

    async def submit(self, item: _Item) -> _Result:
        """Send ``item`` with whatever else is waiting; its result, or its exception raised.

        When nothing waits and a statement may go out, ``item`` goes at once, from the
        caller's own task (no hand-over: a lone call costs what a direct one does), and a
        cancelled caller cancels it as any awaited statement. Otherwise it waits its turn: a
        caller cancelled before its item was sent leaves it unsent; once sent, the statement
        goes on without it.
        """
        if not self._queue and self.in_flight < self._concurrency:
            key = None if self._key is None else self._key(item)
            if key is None or key not in self._busy:
                return await self._send_alone(item, key)
        done: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(item, done))
        self._send_more()
        return await done

    async def _send_alone(self, item: _Item, key: Hashable | None) -> _Result:
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._alone.add(finished)
        if key is not None:
            self._busy.add(key)
        try:
            [outcome] = await self._send([item])
        finally:
            if key is not None:
                self._busy.discard(key)
            self._alone.discard(finished)
            finished.set_result(None)
            self._send_more()  # what arrived meanwhile
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @property
    def in_flight(self) -> int:
        """Statements out now."""
        return len(self._statements) + len(self._alone)

    async def drain(self, grace: float) -> None:
        """Wait (up to ``grace`` seconds) until every submitted item has been answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # asyncio.wait, not awaiting them: a cancel aimed at our caller must reach it
        while (self._statements or self._alone) and loop.time() < deadline:
            pending: set[asyncio.Future[None]] = {*self._statements, *self._alone}
            await asyncio.wait(pending, timeout=deadline - loop.time())

    def fail_waiting(self, error: Callable[[], BaseException]) -> None:
        """Answer every item not yet sent with ``error()`` (never blocks)."""
        while self._queue:
            _settle(self._queue.popleft().done, error())

    def cancel(self) -> None:
        """Cancel the statements in flight; their callers get ``cut_short()``."""
        for statement in list(self._statements):
            statement.cancel()

    def _send_more(self) -> None:
        while self._queue and self.in_flight < self._concurrency:
            batch = self._take()
            if not batch:
                return
            task = asyncio.create_task(self._run(batch), name=self._name)
            self._statements.add(task)
            task.add_done_callback(self._finished)

    def _take(self) -> list[_Call[_Item, _Result]]:
        """The next statement's items: oldest first, one per key, none whose key is in
        flight; the rest keep their place."""
        batch: list[_Call[_Item, _Result]] = []
        kept: collections.deque[_Call[_Item, _Result]] = collections.deque()
        keys: set[Hashable] = set()
        weight = 0
        while self._queue:
            call = self._queue.popleft()
            if call.done.cancelled():
                continue
            key = None if self._key is None else self._key(call.item)
            item_weight = 0 if self._weight is None else self._weight(call.item)
            busy = key is not None and (key in keys or key in self._busy)
            full = len(batch) >= self._max_items or (
                bool(batch) and self._weight is not None and weight + item_weight > self._max_weight
            )
            if busy or full:
                kept.append(call)
                if key is not None:
                    keys.add(key)  # later items of this key wait behind it
                continue
            batch.append(call)
            weight += item_weight
            if key is not None:
                keys.add(key)
                self._busy.add(key)
        self._queue = kept
        return batch

    async def _run(self, batch: list[_Call[_Item, _Result]]) -> None:
        try:
            outcomes = await self._outcomes([call.item for call in batch])
        except asyncio.CancelledError:
            for call in batch:
                _settle(call.done, self._cut_short())
            raise
        except Exception as exc:
            for call in batch:
                _settle(call.done, exc)
        else:
            for call, outcome in zip(batch, outcomes, strict=True):
                _settle(call.done, outcome)
        finally:
            if self._key is not None:
                key = self._key
                self._busy.difference_update(key(call.item) for call in batch)

    async def _outcomes(self, items: list[_Item]) -> Sequence[Outcome[_Result]]:
        try:
            return await self._send(items)
        except Exception as exc:
            if len(items) == 1 or self._split is None or not self._split(exc):
                raise
        outcomes: list[Outcome[_Result]] = []
        for item in items:
            try:
                outcomes.extend(await self._send([item]))
            except Exception as alone:
                outcomes.append(alone)
        return outcomes

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._statements.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("batched statement failed unexpectedly", exc_info=task.exception())
        self._send_more()


def _settle(done: asyncio.Future[_Result], outcome: Outcome[_Result]) -> None:
    """Answer a caller unless it was answered or gave up."""
    if done.done():
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)
