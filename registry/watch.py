"""What one process knows of one run, shared by its handles, tokens, inboxes and streams.

A watch is kept while anything in the process holds it (weakly indexed by the registry).
Notifications and the safety-net re-check both feed it; waiters only ever read it.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol

from registry.models import RunStatus


class Waiter(Protocol):
    """Something that sleeps until told to look at the tables again."""

    def wake(self) -> None:
        """Make the waiter re-read the tables (never blocks)."""

    def position(self) -> int:
        """The newest decision id or chunk seq the waiter has taken from the table."""


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
        self.streams: weakref.WeakSet[Waiter] = weakref.WeakSet()
        #: counts the wake-ups about new chunks; a table read started at generation g has
        #: seen every chunk announced up to g (the announcement follows the commit)
        self.chunk_generation = 0

    def apply(self, status: RunStatus, cancel_requested: bool) -> None:
        """Take in the run's row: trip on cancel or supersede, end when not active."""
        if cancel_requested or status in (RunStatus.CANCELLED, RunStatus.SUPERSEDED):
            self.cancelled.set()
        if status is not RunStatus.ACTIVE:
            self.end()

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
