"""RunWatch and Dispatcher: how rows and notifications change a process's view of its runs."""

from __future__ import annotations

import gc

import pytest

from registry.models import RunStatus
from registry.notifications import ChunkPublished, NotificationKind, RunChanged
from registry.watch import Dispatcher, RunWatch


class FakeInbox:
    """Records wake-ups (an inbox's view of the Waiter protocol)."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1

    def position(self) -> int:
        return 0


class FakeStream(FakeInbox):
    """Records wake-ups and chunk offers (a stream subscription's view)."""

    def __init__(self) -> None:
        super().__init__()
        self.offers: list[tuple[int, bytes | None]] = []

    def offer(self, seq: int, data: bytes | None) -> None:
        self.offers.append((seq, data))


def watched(watch: RunWatch) -> tuple[FakeInbox, FakeStream]:
    """Register one inbox and one stream on ``watch``; the caller must keep them referenced."""
    inbox, stream = FakeInbox(), FakeStream()
    watch.inboxes.add(inbox)
    watch.streams.add(stream)
    return inbox, stream


# --- RunWatch.apply ---------------------------------------------------------------------------


async def test_apply_cancel_requested_trips_cancelled_but_does_not_end() -> None:
    watch = RunWatch("r")
    inbox, stream = watched(watch)
    watch.apply(RunStatus.ACTIVE, cancel_requested=True)
    assert watch.cancelled.is_set()
    assert watch.activated.is_set()
    assert not watch.ended.is_set()
    assert (inbox.wakes, stream.wakes) == (0, 0)


async def test_apply_queued_neither_activates_nor_ends() -> None:
    watch = RunWatch("r")
    inbox, stream = watched(watch)
    watch.apply(RunStatus.QUEUED, cancel_requested=False)
    assert not watch.activated.is_set()
    assert not watch.ended.is_set()
    assert (inbox.wakes, stream.wakes) == (0, 0)
    watch.apply(RunStatus.ACTIVE, cancel_requested=False)
    assert watch.activated.is_set()


async def test_a_cancel_wakes_only_the_inboxes_that_stop_on_it() -> None:
    watch = RunWatch("r")
    inbox, _ = watched(watch)
    stopping, _ = watched(watch)
    watch.cancel_inboxes.add(stopping)
    watch.notify(NotificationKind.CANCEL)
    assert (inbox.wakes, stopping.wakes) == (0, 1)


@pytest.mark.parametrize("status", [RunStatus.CANCELLED, RunStatus.SUPERSEDED])
@pytest.mark.parametrize("cancel_requested", [False, True])
async def test_apply_cancelled_or_superseded_trips_and_ends(
    status: RunStatus, cancel_requested: bool
) -> None:
    watch = RunWatch("r")
    inbox, stream = watched(watch)
    watch.apply(status, cancel_requested=cancel_requested)
    assert watch.cancelled.is_set()
    assert watch.ended.is_set()
    # ending wakes everyone so that they drain and stop
    assert inbox.wakes >= 1
    assert stream.wakes >= 1


async def test_apply_completed_ends_without_cancelling() -> None:
    watch = RunWatch("r")
    inbox, stream = watched(watch)
    watch.apply(RunStatus.COMPLETED, cancel_requested=False)
    assert watch.ended.is_set()
    assert not watch.cancelled.is_set()
    assert inbox.wakes >= 1
    assert stream.wakes >= 1


async def test_apply_completed_with_a_pending_cancel_trips_and_ends() -> None:
    watch = RunWatch("r")
    watch.apply(RunStatus.COMPLETED, cancel_requested=True)
    assert watch.cancelled.is_set()
    assert watch.ended.is_set()


async def test_apply_active_without_cancel_changes_nothing() -> None:
    watch = RunWatch("r")
    inbox, stream = watched(watch)
    generation = watch.chunk_generation
    watch.apply(RunStatus.ACTIVE, cancel_requested=False)
    assert not watch.cancelled.is_set()
    assert not watch.ended.is_set()
    assert (inbox.wakes, stream.wakes) == (0, 0)
    assert watch.chunk_generation == generation


async def test_apply_never_untrips() -> None:
    # cancellation and ending are irreversible: a stale row read later must not undo them
    watch = RunWatch("r")
    watch.apply(RunStatus.CANCELLED, cancel_requested=True)
    watch.apply(RunStatus.ACTIVE, cancel_requested=False)
    assert watch.cancelled.is_set()
    assert watch.ended.is_set()


# --- RunWatch.notify --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cancelled", "ended", "inbox_woken", "stream_woken"),
    [
        (NotificationKind.DECISION, False, False, True, False),
        (NotificationKind.CANCEL, True, False, False, False),
        (NotificationKind.SUPERSEDED, True, True, True, True),
        (NotificationKind.ENDED, False, True, True, True),
        (NotificationKind.CHUNK, False, False, False, True),
        (NotificationKind.ACTIVE, False, False, False, False),
    ],
)
async def test_notify(
    kind: NotificationKind, cancelled: bool, ended: bool, inbox_woken: bool, stream_woken: bool
) -> None:
    watch = RunWatch("r")
    inbox, stream = watched(watch)
    generation = watch.chunk_generation
    watch.notify(kind)
    assert watch.cancelled.is_set() is cancelled
    assert watch.ended.is_set() is ended
    assert (inbox.wakes > 0) is inbox_woken
    assert (stream.wakes > 0) is stream_woken
    # a stream wake-up is a new chunk generation: reads started before it are stale
    assert (watch.chunk_generation > generation) is stream_woken
    assert stream.offers == []


async def test_offer_chunk_hands_the_chunk_to_every_stream() -> None:
    watch = RunWatch("r")
    first, second = FakeStream(), FakeStream()
    inbox = FakeInbox()
    watch.streams.add(first)
    watch.streams.add(second)
    watch.inboxes.add(inbox)
    watch.offer_chunk(3, b"abc")
    watch.offer_chunk(5, None)
    assert first.offers == [(3, b"abc"), (5, None)]
    assert second.offers == [(3, b"abc"), (5, None)]
    assert watch.chunk_generation == 2
    assert (first.wakes, second.wakes, inbox.wakes) == (0, 0, 0)


async def test_a_dropped_waiter_is_forgotten() -> None:
    watch = RunWatch("r")
    kept = FakeStream()
    watch.streams.add(kept)
    watch.streams.add(FakeStream())  # nothing else holds this one
    gc.collect()
    assert list(watch.streams) == [kept]
    watch.end()
    assert kept.wakes == 1


# --- Dispatcher -------------------------------------------------------------------------------


async def test_watch_is_shared_while_held() -> None:
    dispatcher = Dispatcher()
    watch = dispatcher.watch("a")
    assert dispatcher.watch("a") is watch
    assert dispatcher.get("a") is watch
    assert dispatcher.get("b") is None
    assert watch.run_id == "a"


async def test_apply_routes_to_the_run_only() -> None:
    dispatcher = Dispatcher()
    a, b = dispatcher.watch("a"), dispatcher.watch("b")
    a_inbox, a_stream = watched(a)
    b_inbox, b_stream = watched(b)

    dispatcher.apply(RunChanged(NotificationKind.CANCEL, "a"))
    assert a.cancelled.is_set()
    assert not b.cancelled.is_set()

    dispatcher.apply(RunChanged(NotificationKind.DECISION, "b"))
    assert (a_inbox.wakes, b_inbox.wakes) == (0, 1)

    dispatcher.apply(RunChanged(NotificationKind.ENDED, "b"))
    assert b.ended.is_set()
    assert not a.ended.is_set()
    assert not b.cancelled.is_set()
    assert a_stream.wakes == 0
    assert b_stream.wakes == 1

    dispatcher.apply(RunChanged(NotificationKind.SUPERSEDED, "a"))
    assert a.ended.is_set()
    assert a_stream.wakes == 1


async def test_chunk_published_offers_to_the_runs_streams() -> None:
    dispatcher = Dispatcher()
    a, b = dispatcher.watch("a"), dispatcher.watch("b")
    _a_inbox, a_stream = watched(a)
    _b_inbox, b_stream = watched(b)
    generations = (a.chunk_generation, b.chunk_generation)

    dispatcher.apply(ChunkPublished("a", 7, b"\x00seven"))
    dispatcher.apply(ChunkPublished("a", 9, None))
    assert a_stream.offers == [(7, b"\x00seven"), (9, None)]
    assert b_stream.offers == []
    assert a.chunk_generation == generations[0] + 2
    assert b.chunk_generation == generations[1]

    dispatcher.apply(ChunkPublished("b", 1, b"one"))
    assert b_stream.offers == [(1, b"one")]
    assert len(a_stream.offers) == 2
    assert b.chunk_generation == generations[1] + 1
    dispatcher.apply(ChunkPublished("nobody", 1, b"lost"))  # an unwatched run: no error
    assert a_stream.wakes == 0  # an offer is the wake-up; no second one
    assert not a.ended.is_set()


@pytest.mark.parametrize(
    ("kind", "cancelled", "ended"),
    [
        (NotificationKind.CANCEL, True, False),
        (NotificationKind.SUPERSEDED, True, True),
        (NotificationKind.ENDED, False, True),
    ],
)
async def test_recent_notification_applies_to_a_later_watch(
    kind: NotificationKind, cancelled: bool, ended: bool
) -> None:
    dispatcher = Dispatcher()
    dispatcher.apply(RunChanged(kind, "r"))  # nobody watches "r" yet
    assert dispatcher.get("r") is None
    watch = dispatcher.watch("r")
    assert watch.cancelled.is_set() is cancelled
    assert watch.ended.is_set() is ended
    other = dispatcher.watch("other")
    assert not other.cancelled.is_set()
    assert not other.ended.is_set()


async def test_decision_is_not_remembered() -> None:
    dispatcher = Dispatcher(recent_limit=1)
    dispatcher.apply(RunChanged(NotificationKind.CANCEL, "a"))
    # a remembered decision would replace the cancel of "a", or push it out of the memory
    dispatcher.apply(RunChanged(NotificationKind.DECISION, "a"))
    dispatcher.apply(RunChanged(NotificationKind.DECISION, "b"))
    a = dispatcher.watch("a")
    assert a.cancelled.is_set()
    b = dispatcher.watch("b")
    assert not b.cancelled.is_set()
    assert not b.ended.is_set()


async def test_chunk_for_an_unwatched_run_is_not_remembered() -> None:
    dispatcher = Dispatcher(recent_limit=1)
    dispatcher.apply(RunChanged(NotificationKind.CANCEL, "a"))
    dispatcher.apply(ChunkPublished("b", 1, b"x"))
    assert dispatcher.watch("a").cancelled.is_set()


async def test_recent_memory_is_bounded_oldest_first() -> None:
    dispatcher = Dispatcher(recent_limit=2)
    for run_id in ("a", "b", "c"):
        dispatcher.apply(RunChanged(NotificationKind.CANCEL, run_id))
    a, b, c = dispatcher.watch("a"), dispatcher.watch("b"), dispatcher.watch("c")
    assert not a.cancelled.is_set()  # the oldest was forgotten
    assert b.cancelled.is_set()
    assert c.cancelled.is_set()


async def test_recent_memory_refreshes_a_repeated_run() -> None:
    dispatcher = Dispatcher(recent_limit=2)
    dispatcher.apply(RunChanged(NotificationKind.CANCEL, "a"))
    dispatcher.apply(RunChanged(NotificationKind.CANCEL, "b"))
    dispatcher.apply(RunChanged(NotificationKind.ENDED, "a"))  # "a" is now the newest
    dispatcher.apply(RunChanged(NotificationKind.CANCEL, "c"))
    a, b, c = dispatcher.watch("a"), dispatcher.watch("b"), dispatcher.watch("c")
    assert a.ended.is_set()
    assert not b.cancelled.is_set()
    assert c.cancelled.is_set()


async def test_dispatcher_wake_streams_wakes_only_streams() -> None:
    dispatcher = Dispatcher()
    a, b = dispatcher.watch("a"), dispatcher.watch("b")
    a_inbox, a_stream = watched(a)
    b_inbox, b_stream = watched(b)
    generations = (a.chunk_generation, b.chunk_generation)
    dispatcher.wake_streams()
    assert (a_stream.wakes, b_stream.wakes) == (1, 1)
    assert (a_inbox.wakes, b_inbox.wakes) == (0, 0)
    assert (a.chunk_generation, b.chunk_generation) == (generations[0] + 1, generations[1] + 1)
    assert a_stream.offers == b_stream.offers == []


async def test_dispatcher_wake_inboxes_wakes_only_inboxes() -> None:
    dispatcher = Dispatcher()
    a, b = dispatcher.watch("a"), dispatcher.watch("b")
    a_inbox, a_stream = watched(a)
    b_inbox, b_stream = watched(b)
    b.end()  # an ended run's inbox is woken too, so that parked consumers see the end
    b_inbox.wakes = 0
    b_stream.wakes = 0
    dispatcher.wake_inboxes()
    assert (a_inbox.wakes, b_inbox.wakes) == (1, 1)
    assert (a_stream.wakes, b_stream.wakes) == (0, 0)


async def test_live_excludes_ended_watches() -> None:
    dispatcher = Dispatcher()
    a, b, c = dispatcher.watch("a"), dispatcher.watch("b"), dispatcher.watch("c")
    b.end()
    c.apply(RunStatus.SUPERSEDED, cancel_requested=False)
    assert dispatcher.live() == [a]
    assert {watch.run_id for watch in dispatcher.all()} == {"a", "b", "c"}


async def test_unreferenced_watch_disappears() -> None:
    dispatcher = Dispatcher()
    kept = dispatcher.watch("kept")
    dropped = dispatcher.watch("dropped")
    dropped.cancelled.set()
    del dropped
    gc.collect()
    assert dispatcher.get("dropped") is None
    assert dispatcher.all() == [kept]
    assert dispatcher.live() == [kept]
    # a new watch of the run starts fresh (the trip above was local, not a notification)
    again = dispatcher.watch("dropped")
    assert not again.cancelled.is_set()
    # and notifications for a run nobody holds go nowhere but the recent memory
    del again
    gc.collect()
    dispatcher.apply(RunChanged(NotificationKind.DECISION, "dropped"))
    assert dispatcher.all() == [kept]


async def test_a_cancel_then_an_end_before_any_watch_both_apply() -> None:
    watches = Dispatcher()
    watches.apply(RunChanged(NotificationKind.CANCEL, "run-1"))
    watches.apply(RunChanged(NotificationKind.ENDED, "run-1"))
    watch = watches.watch("run-1")
    assert watch.cancelled.is_set()
    assert watch.ended.is_set()
