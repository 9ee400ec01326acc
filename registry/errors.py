"""Exceptions raised by ``registry``.

Every exception derives from :class:`RegistryError`. Errors caused by the caller's input also
derive from :class:`ValueError` and name the offending field, and are raised before anything
is written.
"""

from __future__ import annotations


class RegistryError(Exception):
    """A registry operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidInputError(RegistryError, ValueError):
    """An argument is not acceptable; nothing was written.

    ``field`` names the argument (``decisions[2].result``), ``reason`` says what is wrong
    with it; ``str(error)`` is ``"<field>: <reason>"``.
    """

    field: str
    reason: str

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class TooManyDecisionsError(InvalidInputError):
    """A forward carried more decisions than the registry accepts in one call."""

    def __init__(self, count: int, limit: int) -> None:
        self.count = count
        self.limit = limit
        super().__init__("decisions", f"{count} decisions exceed the limit of {limit} per forward")


class RunAlreadyExistsError(RegistryError, ValueError):
    """A run with this id was registered before; run ids are never reused."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run_id: a run with id {run_id!r} already exists")


class StreamConflictError(RegistryError):
    """A publish with ``after_seq`` found the stream elsewhere: its last seq is not
    ``after_seq``, and the chunks after ``after_seq`` are not the ones given (another
    publisher got there first). Nothing was written."""

    def __init__(self, run_id: str, after_seq: int, last_seq: int | None) -> None:
        self.run_id = run_id
        self.after_seq = after_seq
        self.last_seq = last_seq
        super().__init__(
            f"the stream of run {run_id!r} is at seq {last_seq}, not {after_seq}: "
            "another publisher appended first"
        )


class RegistryClosedError(RegistryError):
    """The registry was closed; open a new one with ``RunRegistry.connect``."""


class DatabaseError(RegistryError):
    """The database refused or failed a statement.

    ``sqlstate`` is PostgreSQL's five-character error code when the server sent one (``None``
    for a failure on our side of the socket). ``is_transient`` says whether the same call may
    succeed if retried later: true for lock and statement timeouts (55P03, 57014), serialization
    failures and deadlocks (class 40), exhausted resources such as too many connections (class
    53), and everything :class:`DatabaseUnavailableError` covers; false for errors that a retry
    repeats (a permission, a missing table). Nothing the call wrote is kept: its transaction
    was rolled back.
    """

    sqlstate: str | None
    is_transient: bool

    def __init__(
        self, message: str, *, sqlstate: str | None = None, is_transient: bool = False
    ) -> None:
        self.sqlstate = sqlstate
        self.is_transient = is_transient
        super().__init__(message)


class DatabaseUnavailableError(DatabaseError):
    """The database could not be reached, or did not answer within the call's deadline.

    Always transient: connection failures (SQLSTATE class 08), a server shutting down or not
    yet accepting connections (57P01, 57P02, 57P03), a broken or silent socket.
    """

    def __init__(self, message: str | None = None, *, sqlstate: str | None = None) -> None:
        super().__init__(
            message or "The database could not be reached.", sqlstate=sqlstate, is_transient=True
        )


class OutcomeUnknownError(DatabaseUnavailableError):
    """The connection was lost after a write was sent, before its commit was confirmed: it may
    or may not be stored.

    The registry retries by itself the calls whose retry converges (register, forward,
    cancel, binding a stream); the others raise this, and retrying them is safe: a second
    ``publish`` stores the chunks again under new seqs (read the stream to see whether the
    first one arrived), a second ``ack`` returns ``False`` once the first one had been
    stored, a second ``remove`` returns ``False`` once the run has ended.
    """


class SchemaNotReadyError(RegistryError):
    """The database schema is missing or older than this version of registry; run migrations."""


class RunEndedError(RegistryError):
    """This registry can no longer act on the run: it ended (finished, superseded, or
    cancelled while queued), or another registry took it over.

    The one error a run body needs to know: a publish, claim or ack on a run that is over here
    raises a subclass of it (:class:`StreamClosedError`, :class:`LeaseLostError`), a queued
    run's ``wait_active`` raises :class:`RunNotStartedError`, and an inbox's ``get`` raises it
    as it is. The run scope
    (``RunRegistry.run``) ends quietly on it, writing nothing over the run's outcome.
    """

    def __init__(self, run_id: str, message: str | None = None) -> None:
        self.run_id = run_id
        super().__init__(message or f"run {run_id!r} is no longer active here")


class RunNotStartedError(RunEndedError):
    """A queued run ended before its turn (cancelled while queued, or deleted): it never
    became active. Raised by ``wait_active``, and so on entering the run scope of a queued
    run, whose block then does not run; nothing is left to record.

    ``status`` is the run's status (``cancelled``), or ``None`` when its row is gone.
    """

    def __init__(self, run_id: str, status: str | None) -> None:
        self.status = status
        super().__init__(
            run_id,
            f"run {run_id!r} ended without becoming active ({status or 'removed'})",
        )


class RunCancelledError(RegistryError):
    """The run was asked to stop (a cancel was requested, or it was superseded); raised by
    ``inbox.get`` of an inbox opened with ``until_cancelled=True``. The run scope records
    the run ``cancelled`` on it (``superseded`` stays as it is)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} was asked to stop")


class ThreadBusyError(RegistryError):
    """A register with ``on_conflict="reject"`` found the thread with an active run; nothing
    was written. ``thread_id`` and ``active_run_id`` name them."""

    def __init__(self, thread_id: str, active_run_id: str) -> None:
        self.thread_id = thread_id
        self.active_run_id = active_run_id
        super().__init__(f"thread {thread_id!r} is busy with the active run {active_run_id!r}")


class StreamClosedError(RunEndedError):
    """The run's stream is not open: bind it first, or the run has ended.

    A :class:`RunEndedError`: after a supersede or an end, every publish raises it. A stream
    never bound on a run still active raises it too (a mistake of the caller's): the run
    scope tells the two apart by the row, and records that run ``failed``.
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(
            run_id, f"the stream of run {run_id!r} is not open: bind it first, or the run has ended"
        )


class LeaseLostError(RunEndedError):
    """This registry no longer owns the run: another registry resumed or adopted it.

    Every change of owner moves the run's ownership epoch on; a claim, ack, publish or remove
    made under an older epoch is refused in SQL and raises this. Stop working on the run (a
    :class:`RunEndedError`: the run scope ends quietly on it, writing nothing).
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(
            run_id, f"run {run_id!r} is owned by another registry now (its lease was lost)"
        )
