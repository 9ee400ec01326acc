"""Appending chunks to runs' streams: :class:`ChunkPublisher`, with group commit across runs.

An agent server streams for many runs at once, and every commit that notifies takes one
database-wide lock (PostgreSQL's notification queue), so one statement per chunk caps the
whole database at a few thousand chunks a second. The publisher therefore sends the appends
of this process's concurrent publishes to different runs as one statement: one commit, one
turn of the lock, one ``chunks`` wake-up listing the runs. A publish that finds nothing in
flight is sent at once (no added latency when idle); those that arrive while ``concurrency``
statements are in flight wait for the next one and go together (group commit).

The contract is unchanged by the batching: a returned publish is committed; seqs of one run
are gapless and in the order of its publishes from this process; each append is checked
against its own owner epoch and ``after_seq``, and is refused on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from registry import repository
from registry.batching import Batcher
from registry.connections import ConnectionLane, converge, refused_by_server
from registry.database import DriverConnection
from registry.errors import (
    LeaseLostError,
    OutcomeUnknownError,
    RegistryClosedError,
    StreamClosedError,
    StreamConflictError,
)
from registry.models import RunStatus
from registry.notifications import (
    ChunksPublished,
    Keyring,
    NotificationKey,
    encode,
    payload_groups,
)

logger = logging.getLogger(__name__)

#: runs whose last chunk notification time the publisher keeps before it forgets quiet ones
_NOTIFIED_LIMIT = 1024
#: appends (runs) in one statement, at most
MAX_BATCH_RUNS = 500
#: largest chunk that rides inside a group commit's wake-up
MAX_BATCH_INLINE_BYTES = 512
#: chunk bytes in one statement, at most (a larger append still goes, alone)
MAX_BATCH_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Append:
    """One publish for the next statement."""

    run_id: str
    chunks: Sequence[bytes]
    epoch: int | None
    after_seq: int | None

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


class ChunkPublisher:
    """Appends chunks to runs' streams and sends their wake-ups, batched across runs and
    coalesced per run.

    ``concurrency``: statements in flight at most (each holds a connection of the lane).
    ``window`` (seconds): a run's chunk wake-ups from this process are sent at most once per
    window; publishes of a run within its window leave a wake-up pending, which a background
    flush sends when the window closes. A statement that carries one append notifies in its
    own right (inline when it is one chunk of at most ``inline_limit`` bytes); one that
    carries several sends one ``chunks`` wake-up for the due runs among them. A returned
    publish is committed; only its wake-up may be a window late.
    """

    def __init__(
        self,
        lane: ConnectionLane,
        keyring: Keyring,
        *,
        window: float,
        inline_limit: int,
        concurrency: int = 4,
    ) -> None:
        self._lane = lane
        self._keyring = keyring
        self._window = window
        self._inline_limit = inline_limit
        # in a wake-up shared by many runs, only chunks this small ride along (a few dozen
        # fit one payload)
        self._batch_inline = min(inline_limit, MAX_BATCH_INLINE_BYTES)
        self._notified_at: dict[str, float] = {}
        self._forget_at = _NOTIFIED_LIMIT
        self._pending: dict[str, int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._appends: Batcher[_Append, int | None] = Batcher(
            self._send,
            concurrency=concurrency,
            max_items=MAX_BATCH_RUNS,
            # one run's appends commit in call order: one at a time, oldest first
            key=lambda append: append.run_id,
            # a statement the server refused: each append alone, for its own answer
            split=refused_by_server,
            weight=lambda append: append.size,
            max_weight=MAX_BATCH_BYTES,
            cut_short=lambda: OutcomeUnknownError(
                "The chunk append was cut short; it may be stored."
            ),
            name="registry-chunk-append",
        )
        self._closed = False
        self._aborted = False

    async def publish(
        self,
        run_id: str,
        chunks: Sequence[bytes],
        *,
        epoch: int | None = None,
        after_seq: int | None = None,
    ) -> list[int]:
        """Append ``chunks`` (validated) in one transaction and return their sequence numbers.

        With ``epoch``, only while the run is held under that owner epoch. With ``after_seq``,
        only right after that seq: when the chunks after it already are these (a retry whose
        first attempt was stored), their seqs are returned and nothing is written, and a lost
        reply is retried here once. Concurrent publishes to one run from this process are
        stored in the order they were called. Raises :class:`StreamClosedError` if the stream
        is not bound or the run has ended, :class:`LeaseLostError` if the run's owner epoch
        moved on, :class:`StreamConflictError` if the stream is past ``after_seq`` with other
        chunks (nothing written in each case), :class:`OutcomeUnknownError` without
        ``after_seq`` when the reply was lost, and :class:`RegistryClosedError` once the
        registry is closing.
        """
        if self._closed:
            raise RegistryClosedError()
        if not chunks:
            return []
        if after_seq is None:
            return await self._append(run_id, chunks, epoch, None)
        # with an expected position the append is idempotent: once more after a lost reply
        return await converge(lambda: self._append(run_id, chunks, epoch, after_seq))

    async def _append(
        self, run_id: str, chunks: Sequence[bytes], epoch: int | None, after_seq: int | None
    ) -> list[int]:
        await self._keyring.get()  # loaded once, before any statement needs it
        if self._closed:
            raise RegistryClosedError()
        last_seq = await self._appends.submit(_Append(run_id, chunks, epoch, after_seq))
        if last_seq is None:
            async with self._lane.autocommit() as connection:
                return await _refused(connection, run_id, chunks, epoch, after_seq)
        first = last_seq - len(chunks) + 1
        return list(range(first, last_seq + 1))

    async def _send(self, batch: list[_Append]) -> list[int | None]:
        key = await self._keyring.get()
        now = asyncio.get_running_loop().time()
        due = [self._due(append.run_id, now) for append in batch]
        outcomes = await self._statement(batch, due, key)
        for append, notify, outcome in zip(batch, due, outcomes, strict=True):
            if outcome is not None:
                self._committed(append.run_id, outcome, notify=notify, now=now)
        return outcomes

    async def _statement(
        self, batch: list[_Append], due: list[bool], key: NotificationKey
    ) -> list[int | None]:
        async with self._lane.autocommit(write=True) as connection:
            if len(batch) == 1:
                [append] = batch
                [notify] = due
                chunks = append.chunks
                inline = None
                if notify and _alone_and_small(append, self._inline_limit):
                    inline = key.seal(append.run_id, chunks[0])
                last_seq = await repository.append_chunks(
                    connection,
                    append.run_id,
                    chunks,
                    notify=notify,
                    inline=inline,
                    key=key,
                    epoch=append.epoch,
                    after_seq=append.after_seq,
                )
                return [last_seq]
            riding = [
                key.seal(append.run_id, append.chunks[0])
                if notify and _alone_and_small(append, self._batch_inline)
                else None
                for append, notify in zip(batch, due, strict=True)
            ]
            announced = [index for index, notify in enumerate(due) if notify]
            groups = iter(
                payload_groups(
                    [batch[index].run_id for index in announced],
                    [len(riding[index] or "") for index in announced],
                )
            )
            appends = [
                repository.ChunkAppend(
                    append.run_id,
                    append.chunks,
                    append.epoch,
                    append.after_seq,
                    next(groups) if notify else None,
                    sealed,
                )
                for append, notify, sealed in zip(batch, due, riding, strict=True)
            ]
            return await repository.append_chunk_batch(connection, appends, key)

    def _due(self, run_id: str, now: float) -> bool:
        """Whether a wake-up for ``run_id`` may go out now (its window has closed)."""
        last = self._notified_at.get(run_id)
        return last is None or now - last >= self._window

    def _committed(self, run_id: str, last_seq: int, *, notify: bool, now: float) -> None:
        if notify:
            if len(self._notified_at) >= self._forget_at:
                self._forget_quiet_runs(now)
            self._notified_at[run_id] = now
            return
        self._pending[run_id] = max(last_seq, self._pending.get(run_id, 0))
        # stop() waits for this flush too; after abort() subscribers elsewhere catch up at
        # their safety re-check, as after a lost notification
        if not self._aborted and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush(), name="registry-chunk-notify")

    def _forget_quiet_runs(self, now: float) -> None:
        # bounded by the runs publishing now: a run quiet for a window needs no entry
        cutoff = now - self._window
        self._notified_at = {run: at for run, at in self._notified_at.items() if at > cutoff}
        # amortised: the next sweep waits until the table has doubled again
        self._forget_at = max(_NOTIFIED_LIMIT, 2 * len(self._notified_at))

    async def stop(self, grace: float) -> None:
        """Refuse new publishes, let the accepted ones finish and send the pending wake-ups
        rather than drop them (subscribers elsewhere wait on them), giving up after ``grace``
        seconds."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self._appends.drain(grace)
        flusher = self._flusher
        if flusher is None or flusher.done():
            return
        await asyncio.wait({flusher}, timeout=max(0.0, deadline - loop.time()))
        if not flusher.done():
            flusher.cancel()
            logger.warning(
                "close: skipped the last chunk wake-ups of %d runs (no answer within %gs); "
                "their subscribers catch up at their safety re-check",
                len(self._pending),
                grace,
            )

    def abort(self) -> None:
        """Refuse new publishes, fail the unsent ones with :class:`RegistryClosedError` and
        drop the pending wake-ups now (never blocks)."""
        self._closed = self._aborted = True
        self._appends.fail_waiting(RegistryClosedError)
        if self._flusher is not None:
            self._flusher.cancel()

    async def _flush(self) -> None:
        # one wake-up per run per window: later publishes in the window ride on this one, sent
        # as soon as the earliest pending run's window closes
        loop = asyncio.get_running_loop()
        while self._pending:
            opened = min(self._notified_at.get(run_id, 0.0) for run_id in self._pending)
            await asyncio.sleep(max(0.0, opened + self._window - loop.time()))
            now = loop.time()
            due = {
                run_id: seq
                for run_id, seq in self._pending.items()
                if now - self._notified_at.get(run_id, 0.0) >= self._window
            }
            for run_id in due:
                del self._pending[run_id]
                self._notified_at[run_id] = now
            try:
                key = await self._keyring.get()  # loaded by the publish that got us here
                payloads = [encode(ChunksPublished(runs), key) for runs in _grouped(due)]
                async with self._lane.autocommit() as connection:
                    await repository.notify(connection, payloads)
            except RegistryClosedError:
                return  # closed under us (a cancelled close): nothing to report
            except Exception:
                # subscribers still catch up at their safety re-check; the rows are there
                logger.warning("coalesced chunk notification failed", exc_info=True)
        horizon = loop.time() - self._window
        for run_id, at in list(self._notified_at.items()):
            if at < horizon:
                del self._notified_at[run_id]


def _alone_and_small(append: _Append, limit: int) -> bool:
    """Whether ``append`` is one chunk of at most ``limit`` bytes (it may travel inline)."""
    return len(append.chunks) == 1 and len(append.chunks[0]) <= limit


def _grouped(heads: dict[str, int]) -> list[tuple[tuple[str, int], ...]]:
    """``heads`` (run id to newest seq) split into payloads that each fit a notification."""
    payloads: dict[int, list[tuple[str, int]]] = {}
    for group, head in zip(payload_groups(list(heads)), heads.items(), strict=True):
        payloads.setdefault(group, []).append(head)
    return [tuple(runs) for runs in payloads.values()]


async def _refused(
    connection: DriverConnection,
    run_id: str,
    chunks: Sequence[bytes],
    epoch: int | None,
    after_seq: int | None,
) -> list[int]:
    """Why an append wrote nothing, raised; or the seqs of ``chunks`` when they already follow
    ``after_seq`` (a retry of a publish that was stored)."""
    state = await repository.stream_state(connection, run_id)
    if state is None or state.status is not RunStatus.ACTIVE or state.stream_seq is None:
        raise StreamClosedError(run_id)
    if epoch is not None and state.owner_epoch != epoch:
        raise LeaseLostError(run_id)
    assert after_seq is not None  # an open stream of the run we hold refuses only then
    stored = await repository.read_chunks(connection, run_id, after=after_seq, limit=len(chunks))
    if [chunk.data for chunk in stored] == list(chunks):
        return [chunk.seq for chunk in stored]
    raise StreamConflictError(run_id, after_seq, state.stream_seq)
