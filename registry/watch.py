"""What one process knows of its runs, and how a notification changes it. No I/O here.

A :class:`RunWatch` holds one run's local state (cancelled, ended) and the waiters to wake
(inboxes, stream subscriptions); handles, tokens, inboxes and subscriptions of the run share
it. The :class:`Dispatcher` keeps the process's watches (weakly: a watch lives while something
holds it) and applies each notification to them; the safety net applies rows read from the
tables. Waiters only ever read a watch.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from typing import Protocol

from registry.models import RunStatus, is_cancelled
from registry.notifications import ChunkPublished, Notification, NotificationKind

#: how many runs' recent cancel and end notifications are kept for watches created after them
RECENT_LIMIT = 4096
#: the irreversible kinds a watch created later must still see
_REMEMBERED = frozenset(
    {NotificationKind.CANCEL, NotificationKind.SUPERSEDED, NotificationKind.ENDED}
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


class RunWatch:
    """Local state of one run: cancelled and ended flags plus the waiters to wake.

    Cancellation and ending are irreversible once committed, so a notification (sent only at
    commit) may set them directly; the safety-net re-check sets them from the table when a
    notification was lost.
    """

    __slots__ = (
        "__weakref__",
        "cancelled",
        "chunk_generation",
        "ended",
        "inboxes",
        "run_id",
        "streams",
    )

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.cancelled = asyncio.Event()
        self.ended = asyncio.Event()
        self.inboxes: weakref.WeakSet[Waiter] = weakref.WeakSet()
        self.streams: weakref.WeakSet[StreamWaiter] = weakref.WeakSet()
        #: counts the wake-ups about new chunks; a table read started at generation g has
        #: seen every chunk announced up to g (the announcement follows the commit)
        self.chunk_generation = 0

    def apply(self, status: RunStatus, *, cancel_requested: bool) -> None:
        """Take in the run's row: trip on cancel or supersede, end when not active."""
        if is_cancelled(status, cancel_requested=cancel_requested):
            self.cancelled.set()
        if status is not RunStatus.ACTIVE:
            self.end()

    def notify(self, kind: NotificationKind) -> None:
        """Take in a notification about the run (sent at commit, so it may be trusted)."""
        if kind is NotificationKind.DECISION:
            self.wake_inboxes()
        elif kind is NotificationKind.CANCEL:
            self.cancelled.set()
        elif kind is NotificationKind.SUPERSEDED:
            self.cancelled.set()
            self.end()
        elif kind is NotificationKind.ENDED:
            self.end()
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
        self.wake_inboxes()
        self.wake_streams()

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
            watch = RunWatch(run_id)
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
        """Every inbox re-reads its table (on close, so parked consumers see the end)."""
        for watch in self.all():
            watch.wake_inboxes()
