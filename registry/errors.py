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


class RegistryClosedError(RegistryError):
    """The registry was closed; open a new one with ``RunRegistry.connect``."""


class DatabaseUnavailableError(RegistryError):
    """The database could not be reached."""


class SchemaNotReadyError(RegistryError):
    """The database schema is missing or older than this version of registry; run migrations."""


class StreamClosedError(RegistryError):
    """The run's stream is not open: bind it first, or the run has ended."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"the stream of run {run_id!r} is not open: bind it first, or the run has ended"
        )
