"""Forwarding decisions to runs, batched across runs: :class:`DecisionForwarder`.

A forward writes its decisions and notifies the run's owner in one statement; every commit
that notifies takes one database-wide lock, so a process forwarding to many runs at once
sends the forwards that arrive together as one statement (group commit, see
:mod:`registry.batching`), one forward per run (or thread) in each, each forward keeping its
own answer and its all-or-none.
"""

from __future__ import annotations

from collections.abc import Callable

from registry import repository
from registry.batching import Batcher
from registry.connections import ConnectionLane, converge, refused_by_server
from registry.errors import OutcomeUnknownError
from registry.notifications import Keyring

#: forwards in one statement, at most
MAX_FORWARD_BATCH = 200


class DecisionForwarder:
    """Sends forwards by run id and by thread, ``concurrency`` statements of each at most in
    flight; what arrives meanwhile goes together in the next statement."""

    def __init__(self, lane: ConnectionLane, keyring: Keyring, *, concurrency: int) -> None:
        self._lane = lane
        self._keyring = keyring
        self._concurrency = concurrency
        self._by_run_id = self._batcher(key=lambda forward: forward.run_id)
        self._by_thread = self._batcher(key=lambda forward: forward.thread_id)

    def _batcher(
        self, *, key: Callable[[repository.Forward], str | None]
    ) -> Batcher[repository.Forward, repository.ForwardResult | None]:
        return Batcher(
            self._send,
            concurrency=self._concurrency,
            max_items=MAX_FORWARD_BATCH,
            key=key,  # one forward per run (or thread) per statement
            split=refused_by_server,
            cut_short=lambda: OutcomeUnknownError("The forward was cut short."),
            name="registry-forward",
        )

    async def forward(self, forward: repository.Forward) -> repository.ForwardResult | None:
        """Store ``forward`` (see ``RunRegistry.forward_decisions_by_run_id`` and
        ``..._by_thread``), all of its decisions or none; retried once after a lost reply,
        which their decision ids make safe (the registry gives one to each that has none)."""
        batcher = self._by_thread if forward.run_id is None else self._by_run_id
        return await converge(lambda: batcher.submit(forward))

    async def _send(
        self, forwards: list[repository.Forward]
    ) -> list[repository.ForwardResult | None]:
        key = await self._keyring.get()
        async with self._lane.autocommit(write=True) as connection:
            if len(forwards) > 1:
                return await repository.forward_batch(connection, forwards, key)
            [forward] = forwards
            if forward.run_id is not None:
                return [
                    await repository.forward_by_run_id(
                        connection, forward.run_id, forward.decisions, forward.results, key
                    )
                ]
            assert forward.thread_id is not None
            assert forward.agent_id is not None
            return [
                await repository.forward_by_thread(
                    connection,
                    forward.agent_id,
                    forward.thread_id,
                    forward.decisions,
                    forward.results,
                    key,
                )
            ]
