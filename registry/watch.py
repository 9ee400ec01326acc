"""What one process knows of its runs, and how a notification changes it. No I/O here.

A :class:`RunWatch` holds one run's local state (cancelled, ended) and the waiters to wake
(inboxes, stream subscriptions); handles, tokens, inboxes and subscriptions of the run share
it. The :class:`Dispatcher` keeps the process's watches (weakly: a watch lives while something
holds it) and applies each notification to them; the safety net applies rows read from the
tables. Waiters only ever read a watch. :class:`Closing` is the registry's close as the
waiters see it: once closed, every wait and every read of theirs raises
:class:`RegistryClosedError`.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from registry.errors import RegistryClosedError
from registry.models import RunStatus, is_cancelled
from registry.notifications import (
    ChunkPublished,
    ChunksPublished,
    Notification,
    NotificationKind,
)

_T = TypeVar("_T")

#: how many runs' recent cancel and end notifications are kept for watches created after them
RECENT_LIMIT = 4096
#: the irreversible kinds a watch created later must still see
_REMEMBERED = frozenset(
    {
        NotificationKind.CANCEL,
        NotificationKind.SUPERSEDED,
        NotificationKind.ENDED,
        NotificationKind.ACTIVE,
    }
)


class Waiter(Protocol):
    """Something that sleeps until told to look at the tables again."""

    def wake(self) -> None:
        """Make the waiter re-read the tables (never blocks)."""

    def position(self) -> int:
        """The newest decision id or chunk seq the waiter has taken from the table."""


class StreamWaiter(Waiter, Protocol):
    """A stream subscriber: also takes chunk notifications, possibly with inline data."""

    def offer(self, seq: int, data: bytes | None) -> None:
        """Take a chunk notification (never blocks, never awaits)."""


def _consume(future: asyncio.Future[Any]) -> None:
    # an outcome nobody waits for any more must not be reported as "never retrieved"
    if not future.cancelled():
        future.exception()


def _canceller(task: asyncio.Future[Any]) -> Callable[[asyncio.Future[None]], None]:
    def cancel(_signal: asyncio.Future[None]) -> None:
        task.cancel()

    return cancel


class Closing:
    """Whether the registry has closed, shared by its watches; waiters race their I/O with it.

    Closing is irreversible and needs no I/O: :meth:`close` only flips a flag and resolves a
    future, so ``close()`` can end every waiter even when it is cancelled itself.
    """

    __slots__ = ("_closed", "_signal")

    def __init__(self) -> None:
        self._closed = False
        # created on first use: it belongs to the running loop
        self._signal: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        """Whether the registry has closed."""
        return self._closed

    def close(self) -> None:
        """Mark the registry closed and stop every :meth:`race` in progress (never blocks)."""
        self._closed = True
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    def check(self) -> None:
        """Raise :class:`RegistryClosedError` if the registry has closed."""
        if self._closed:
            raise RegistryClosedError()

    async def race(self, awaitable: Awaitable[_T]) -> _T:
        """Await ``awaitable`` unless the registry closes first.

        A result that is ready wins; otherwise, once the registry has closed (before or
        meanwhile), ``awaitable`` is cancelled and :class:`RegistryClosedError` raised.
        Cancelling the caller cancels ``awaitable`` too.
        """
        task = asyncio.ensure_future(awaitable)
        task.add_done_callback(_consume)
        if self._closed:
            task.cancel()
            raise RegistryClosedError()
        if self._signal is None:
            self._signal = asyncio.get_running_loop().create_future()
        signal = self._signal
        # a callback, not asyncio.wait: the close cancels the task itself, at no cost per call
        stop = _canceller(task)
        signal.add_done_callback(stop)
        try:
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if self._closed and (caller is None or not caller.cancelling()):
                raise RegistryClosedError() from None
            raise
        finally:
            signal.remove_done_callback(stop)


class Lease:
    """A hold on one run under one owner epoch (the run's fencing token when it was taken).

    Claims, acks, publishes and removes made through the run's handles carry ``epoch``;
    PostgreSQL refuses them once the run's epoch has moved on (another registry resumed or
    adopted it). ``lost`` is set when that is seen, by a refused statement or by the
    heartbeat: the run's tokens then read as tripped and its inboxes raise
    :class:`~registry.errors.LeaseLostError`.
    """

    __slots__ = ("epoch", "lost", "run_id")

    def __init__(self, run_id: str, epoch: int) -> None:
        self.run_id = run_id
        self.epoch = epoch
        self.lost = asyncio.Event()


class RunWatch:
    """Local state of one run: cancelled and ended flags plus the waiters to wake.

    Cancellation and ending are irreversible once committed, so a notification (sent only at
    commit) may set them directly; the safety-net re-check sets them from the table when a
    notification was lost. ``closing`` is the registry's (a watch made without one has its own).
    """

    __slots__ = (
        "__weakref__",
        "activated",
        "cancel_inboxes",
        "cancelled",
        "chunk_generation",
        "closing",
        "ended",
        "inboxes",
        "run_id",
        "streams",
        "token_waiters",
    )

    def __init__(self, run_id: str, closing: Closing | None = None) -> None:
        self.run_id = run_id
        self.closing = Closing() if closing is None else closing
        self.cancelled = asyncio.Event()
        self.ended = asyncio.Event()
        #: set once the run is seen active (a queued run's ``wait_active`` waits on it)
        self.activated = asyncio.Event()
        self.inboxes: weakref.WeakSet[Waiter] = weakref.WeakSet()
        #: the inboxes opened ``until_cancelled``: a cancel wakes them (and them only) to stop
        self.cancel_inboxes: weakref.WeakSet[Waiter] = weakref.WeakSet()
        self.streams: weakref.WeakSet[StreamWaiter] = weakref.WeakSet()
        #: futures of parked ``token.wait()`` calls, resolved by a cancel, a lost lease or the
        #: registry's close (one wake-up, no task per waiter)
        self.token_waiters: list[asyncio.Future[None]] = []
        #: counts the wake-ups about new chunks; a table read started at generation g has
        #: seen every chunk announced up to g (the announcement follows the commit)
        self.chunk_generation = 0

    @property
    def closed(self) -> bool:
        """Whether the registry has closed: waiters of the run raise, and nothing more comes."""
        return self.closing.closed

    async def wait_cancelled(self, lost: asyncio.Event | None = None) -> None:
        """Return once the run is cancelled or superseded (or ``lost`` is set: a lease lost).

        Raises :class:`RegistryClosedError` if the registry closes first (at once if it has
        already closed); a cancel already seen still returns.
        """

        await self._park_until(
            lambda: self.cancelled.is_set() or (lost is not None and lost.is_set())
        )

    async def _park_until(self, done: Callable[[], bool]) -> None:
        # one future per parked waiter, resolved by wake_token_waiters (no task per waiter)
        while not done():
            self.closing.check()
            waiter = asyncio.get_running_loop().create_future()
            self.token_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.token_waiters:
                    self.token_waiters.remove(waiter)

    def wake_token_waiters(self) -> None:
        """Parked ``token.wait()`` calls look again: a cancel, a lost lease, the close."""
        waiters, self.token_waiters = self.token_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _cancel(self) -> None:
        self.cancelled.set()
        self.wake_token_waiters()
        for inbox in list(self.cancel_inboxes):
            inbox.wake()

    def _activate(self) -> None:
        self.activated.set()
        self.wake_token_waiters()  # ``wait_active`` parks with the token waiters

    def close(self) -> None:
        """The registry closed: wake every waiter of the run so that it sees it and stops."""
        self.closing.close()
        self.wake_token_waiters()
        self.wake_inboxes()
        self.wake_streams()

    def apply(self, status: RunStatus, *, cancel_requested: bool) -> None:
        """Take in the run's row: trip on cancel or supersede, note it active, end when it
        has an outcome."""
        if is_cancelled(status, cancel_requested=cancel_requested):
            self._cancel()
        if status is RunStatus.ACTIVE:
            self._activate()
        if status.is_finished:
            self.end()

    def notify(self, kind: NotificationKind) -> None:
        """Take in a notification about the run (sent at commit, so it may be trusted)."""
        if kind is NotificationKind.DECISION:
            self.wake_inboxes()
        elif kind is NotificationKind.CANCEL:
            self._cancel()
        elif kind is NotificationKind.SUPERSEDED:
            self._cancel()
            self.end()
        elif kind is NotificationKind.ENDED:
            self.end()
        elif kind is NotificationKind.ACTIVE:
            self._activate()
        elif kind is NotificationKind.CHUNK:
            self.wake_streams()

    def offer_chunk(self, seq: int, data: bytes | None) -> None:
        """Chunks up to ``seq`` are committed; hand the news to every subscriber."""
        self.chunk_generation += 1
        for stream in list(self.streams):
            stream.offer(seq, data)

    def end(self) -> None:
        """The run ended: nothing new will arrive; wake everyone to drain and stop."""
        self.ended.set()
        self.wake_token_waiters()  # a queued run's ``wait_active`` stops
        self.wake_inboxes()
        self.wake_streams()

    async def wait_active(self) -> None:
        """Return once the run is seen active or ended (read its row to tell which).

        Raises :class:`RegistryClosedError` if the registry closes first.
        """
        await self._park_until(lambda: self.activated.is_set() or self.ended.is_set())

    def wake_inboxes(self) -> None:
        """New decisions may be in the table."""
        for inbox in list(self.inboxes):
            inbox.wake()

    def wake_streams(self) -> None:
        """New chunks may be in the table."""
        self.chunk_generation += 1
        for stream in list(self.streams):
            stream.wake()


class Dispatcher:
    """The watches of one process, and where every notification is applied.

    ``apply`` runs inside the listener's callback: it only sets events and wakes waiters.
    """

    def __init__(self, recent_limit: int = RECENT_LIMIT) -> None:
        #: the registry's close, shared by every watch (those made after it are closed too)
        self.closing = Closing()
        self._watches: weakref.WeakValueDictionary[str, RunWatch] = weakref.WeakValueDictionary()
        # cancel and end notifications of runs nobody watched yet: a handle created from a
        # row read just before the notification arrived must still see it
        self._recent: collections.OrderedDict[str, set[NotificationKind]] = (
            collections.OrderedDict()
        )
        self._recent_limit = recent_limit

    def watch(self, run_id: str) -> RunWatch:
        """The run's watch, created (with any recent cancel or end applied) if none is held."""
        watch = self._watches.get(run_id)
        if watch is None:
            watch = RunWatch(run_id, self.closing)
            for kind in self._recent.get(run_id, ()):
                watch.notify(kind)
            self._watches[run_id] = watch
        return watch

    def get(self, run_id: str) -> RunWatch | None:
        """The run's watch if something in this process holds it."""
        return self._watches.get(run_id)

    def live(self) -> list[RunWatch]:
        """Every held watch whose run has not ended."""
        return [watch for watch in self._watches.values() if not watch.ended.is_set()]

    def all(self) -> list[RunWatch]:
        """Every held watch."""
        return list(self._watches.values())

    def apply(self, notification: Notification) -> None:
        """Apply a parsed notification to the watch of its run."""
        if isinstance(notification, ChunkPublished):
            chunk_watch = self._watches.get(notification.run_id)
            if chunk_watch is not None:
                chunk_watch.offer_chunk(notification.seq, notification.data)
            return
        if isinstance(notification, ChunksPublished):
            for index, (run_id, seq) in enumerate(notification.runs):
                chunk_watch = self._watches.get(run_id)
                if chunk_watch is not None:
                    # unsealed here, for the runs this process watches only
                    chunk_watch.offer_chunk(seq, notification.data(index))
            return
        if notification.kind in _REMEMBERED:
            # every kind seen is kept: a cancel followed by an end must still trip the token
            self._recent.setdefault(notification.run_id, set()).add(notification.kind)
            self._recent.move_to_end(notification.run_id)
            if len(self._recent) > self._recent_limit:
                self._recent.popitem(last=False)
        watch = self._watches.get(notification.run_id)
        if watch is not None:
            watch.notify(notification.kind)

    def wake_streams(self) -> None:
        """Every subscriber re-reads its table (notifications may have been lost)."""
        for watch in self.all():
            watch.wake_streams()

    def wake_inboxes(self) -> None:
        """Every inbox re-reads its table."""
        for watch in self.all():
            watch.wake_inboxes()

    def close(self) -> None:
        """The registry closed: every waiter of every run raises :class:`RegistryClosedError`
        (those parked wake now); watches made from now on are closed (never blocks)."""
        self.closing.close()
        for watch in self.all():
            watch.close()
