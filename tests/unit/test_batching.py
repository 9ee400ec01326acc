"""Group commit's batcher: at once when idle, together when busy, one answer per caller,
one item per key per statement in submission order, limits, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from registry.batching import Batcher, Outcome


class Statements:
    """A send function that records each batch and, when ``hold`` is clear, waits for it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.started = asyncio.Event()

    async def send(self, items: list[str]) -> Sequence[Outcome[str]]:
        self.batches.append(items)
        self.started.set()
        await self.hold.wait()
        return [ValueError(item) if item.startswith("bad") else item.upper() for item in items]


def batcher(statements: Statements, **options: object) -> Batcher[str, str]:
    settings: dict[str, object] = {
        "concurrency": 1,
        "max_items": 100,
        "cut_short": lambda: RuntimeError("cut short"),
    }
    settings.update(options)
    return Batcher(statements.send, **settings)  # type: ignore[arg-type]


async def busy(statements: Statements, sender: Batcher[str, str]) -> asyncio.Task[str]:
    """A first item in flight, held, so that what follows waits."""
    statements.hold.clear()
    first = asyncio.ensure_future(sender.submit("first"))
    async with asyncio.timeout(5):
        await statements.started.wait()
    return first


async def test_an_item_is_sent_at_once_when_nothing_is_in_flight() -> None:
    statements = Statements()
    assert await batcher(statements).submit("a") == "A"
    assert statements.batches == [["a"]]


async def test_items_that_arrive_while_busy_go_together() -> None:
    statements = Statements()
    sender = batcher(statements)
    first = await busy(statements, sender)
    rest = [asyncio.ensure_future(sender.submit(item)) for item in "bcd"]
    await asyncio.sleep(0)
    assert statements.batches == [["first"]], "nothing more while the one statement is out"
    statements.hold.set()
    assert await first == "FIRST"
    assert [await call for call in rest] == ["B", "C", "D"]
    assert statements.batches == [["first"], ["b", "c", "d"]]


async def test_each_caller_gets_its_own_answer() -> None:
    statements = Statements()
    sender = batcher(statements)
    first = await busy(statements, sender)
    good = asyncio.ensure_future(sender.submit("good"))
    bad = asyncio.ensure_future(sender.submit("bad-1"))
    statements.hold.set()
    await first
    assert await good == "GOOD"
    with pytest.raises(ValueError, match="bad-1"):
        await bad


async def test_a_failed_statement_fails_each_of_its_callers() -> None:
    async def broken(items: list[str]) -> Sequence[Outcome[str]]:
        raise ConnectionError("gone")

    sender: Batcher[str, str] = Batcher(
        broken, concurrency=1, max_items=10, cut_short=lambda: RuntimeError("cut")
    )
    calls = [asyncio.ensure_future(sender.submit(item)) for item in "ab"]
    for call in calls:
        with pytest.raises(ConnectionError):
            await call


async def test_one_item_per_key_per_statement_in_submission_order() -> None:
    statements = Statements()
    sender = batcher(statements, concurrency=2, key=lambda item: item[0])
    first = await busy(statements, sender)  # key "f" in flight, held
    items = ["a1", "f2", "a2", "b1", "a3"]
    calls = [asyncio.ensure_future(sender.submit(item)) for item in items]
    async with asyncio.timeout(5):
        while len(statements.batches) < 2:
            await asyncio.sleep(0)
    # the second statement went at once with the first caller; the rest wait for a free one
    assert statements.batches == [["first"], ["a1"]]
    statements.hold.set()
    await first
    assert [await call for call in calls] == [item.upper() for item in items]
    sent = [item for batch in statements.batches for item in batch]
    for batch in statements.batches:
        assert len({item[0] for item in batch}) == len(batch), "one item per key"
    submitted = ["first", *items]
    for key in "afb":
        order = [item for item in submitted if item[0] == key]
        assert [item for item in sent if item[0] == key] == order, "in submission order"


async def test_limits_on_items_and_weight() -> None:
    statements = Statements()
    sender = batcher(statements, max_items=2, weight=len, max_weight=4)
    first = await busy(statements, sender)
    calls = [asyncio.ensure_future(sender.submit(item)) for item in ["aa", "bb", "c", "dddd", "ee"]]
    await asyncio.sleep(0)
    statements.hold.set()
    await first
    await asyncio.gather(*calls)
    # two items at most; "dddd" would take "c"'s batch past four, "ee" does not (items
    # without a key keep no order among themselves)
    assert statements.batches == [["first"], ["aa", "bb"], ["c", "ee"], ["dddd"]]


async def test_a_caller_cancelled_before_its_statement_is_not_sent() -> None:
    statements = Statements()
    sender = batcher(statements)
    first = await busy(statements, sender)
    gone = asyncio.ensure_future(sender.submit("gone"))
    kept = asyncio.ensure_future(sender.submit("kept"))
    await asyncio.sleep(0)
    gone.cancel()
    statements.hold.set()
    await first
    assert await kept == "KEPT"
    assert statements.batches == [["first"], ["kept"]]


async def test_unsent_callers_fail_and_cancelled_statements_answer_cut_short() -> None:
    statements = Statements()
    sender = batcher(statements)
    first = await busy(statements, sender)  # alone, in its caller's task: not ours to cancel
    dropped = asyncio.ensure_future(sender.submit("dropped"))
    await asyncio.sleep(0)
    sender.fail_waiting(lambda: LookupError("closed"))
    with pytest.raises(LookupError, match="closed"):
        await dropped
    waiting = [asyncio.ensure_future(sender.submit(item)) for item in ("w1", "w2")]
    await asyncio.sleep(0)
    statements.started.clear()
    statements.hold.set()  # lets the first go (its waiter is woken) ...
    statements.hold.clear()  # ... and holds the statement of w1 and w2, in its own task
    assert await first == "FIRST"
    async with asyncio.timeout(5):
        await statements.started.wait()
    assert statements.batches[-1] == ["w1", "w2"]
    sender.cancel()
    for call in waiting:
        with pytest.raises(RuntimeError, match="cut short"):
            await call
    await sender.drain(5)
    assert sender.in_flight == 0


async def test_a_lone_item_goes_from_its_callers_own_task() -> None:
    senders: list[asyncio.Task[object] | None] = []

    async def send(items: list[str]) -> Sequence[Outcome[str]]:
        senders.append(asyncio.current_task())
        return items

    sender: Batcher[str, str] = Batcher(
        send, concurrency=1, max_items=10, cut_short=lambda: RuntimeError("cut")
    )
    assert await sender.submit("alone") == "alone"
    assert senders == [asyncio.current_task()]


async def test_a_refused_statement_is_split_so_only_the_item_at_fault_fails() -> None:
    batches: list[list[str]] = []

    async def refuses_poison(items: list[str]) -> Sequence[Outcome[str]]:
        batches.append(items)
        await asyncio.sleep(0)  # a round trip: what arrives meanwhile waits
        if "poison" in items:
            raise LookupError("refused")
        return [item.upper() for item in items]

    sender: Batcher[str, str] = Batcher(
        refuses_poison,
        concurrency=1,
        max_items=10,
        cut_short=lambda: RuntimeError("cut"),
        split=lambda error: isinstance(error, LookupError),
    )
    calls = [asyncio.ensure_future(sender.submit(item)) for item in ["lead", "a", "poison", "b"]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == "LEAD"
    assert results[1] == "A"
    assert isinstance(results[2], LookupError)
    assert results[3] == "B"
    assert batches == [["lead"], ["a", "poison", "b"], ["a"], ["poison"], ["b"]]
