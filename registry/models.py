"""Pure domain types (decisions, run records, deliveries, chunks) and argument validation.

No SQL and no I/O here. Every check raises :class:`InvalidInputError` naming the argument, so
a bad call is refused before anything is written.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError, field_validator

from registry.errors import InvalidInputError, TooManyDecisionsError

#: Longest id (run, thread, agent, target, decision) the registry stores.
MAX_ID_LENGTH = 255

#: The PostgreSQL schema that holds every object of the registry, unless the URL's ``schema``
#: parameter, :attr:`RegistrySettings.schema` or ``REGISTRY_SCHEMA`` names another.
DEFAULT_SCHEMA = "registry"
#: what a schema name may be: a plain lower-case identifier, so that quoting it is all it needs
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: Longest free-text ``reason`` on a decision.
MAX_REASON_LENGTH = 65_536
#: Largest value of the database's ``bigint``: seqs, ids and counts are stored as one.
MAX_BIGINT = 2**63 - 1
#: Largest ``updated_at`` that fits the database's ``bigint``.
MAX_UPDATED_AT = MAX_BIGINT


class RunStatus(enum.StrEnum):
    """Lifecycle of a run: ``queued`` (behind the thread's active run), ``active``, then one
    outcome. Only ``active`` runs can be reached through the registry API's lookups."""

    ACTIVE = "active"
    QUEUED = "queued"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def is_finished(self) -> bool:
        """Whether this is an outcome: neither ``active`` nor ``queued``."""
        return self not in (RunStatus.ACTIVE, RunStatus.QUEUED)


class RunOutcome(enum.StrEnum):
    """How a run ended, as ``RunHandle.finish`` records it (``superseded`` is the registry's
    own doing, never given)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class ConflictPolicy(enum.StrEnum):
    """What ``register`` does when the thread already has an active run.

    ``supersede`` (the default, the seed's): the new run replaces it. ``reject``: raise
    :class:`~registry.errors.ThreadBusyError`, nothing written. ``enqueue``: the new run is
    stored ``queued`` and becomes active when the runs before it have ended, in order of
    arrival.
    """

    SUPERSEDE = "supersede"
    REJECT = "reject"
    ENQUEUE = "enqueue"


class DecisionStatus(enum.StrEnum):
    """Delivery state of a forwarded decision."""

    PENDING = "pending"
    DELIVERED = "delivered"
    ACKED = "acked"
    DROPPED = "dropped"


class ResumeDecisionAction(enum.StrEnum):
    """What to do with the suspended tool call a decision targets."""

    RESUME = "resume"
    CANCEL = "cancel"


def check_text(field: str, value: object, *, max_length: int, allow_empty: bool) -> str:
    """Return ``value`` if it is a storable string, else raise :class:`InvalidInputError`.

    Storable means: a ``str``, non-empty unless allowed, at most ``max_length`` characters,
    without NUL (PostgreSQL text cannot hold it) and encodable as UTF-8 (no lone surrogates).
    """
    if not isinstance(value, str):
        raise InvalidInputError(field, f"expected a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidInputError(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidInputError(
            field, f"is {len(value)} characters long; the limit is {max_length}"
        )
    if "\x00" in value:
        raise InvalidInputError(field, "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(field, "is not valid UTF-8 (lone surrogate)") from None
    return value


def checked_schema(name: str) -> str:
    """``name`` if it is a plain lower-case identifier (``[a-z_][a-z0-9_]{0,62}``), the only
    schema names the registry takes (it quotes them into DDL and statements); else raises
    :class:`InvalidInputError` naming ``schema``."""
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise InvalidInputError(
            "schema", f"{str(name)[:80]!r} is not a plain lower-case identifier ([a-z_][a-z0-9_]*)"
        )
    return name


def check_id(field: str, value: object) -> str:
    """Validate a run, thread or agent id: a non-empty string of at most 255 characters."""
    return check_text(field, value, max_length=MAX_ID_LENGTH, allow_empty=False)


def _check_json(field: str, value: object, depth: int = 0) -> None:
    # jsonb rejects NaN/Infinity and the \u0000 escape, so catch both here, before any write.
    if depth > 200:
        raise InvalidInputError(field, "is nested too deeply")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(field, "contains a non-finite number, which JSON cannot hold")
        return
    if isinstance(value, str):
        check_text(field, value, max_length=2**31, allow_empty=True)
        return
    if isinstance(value, list):
        for item in value:
            _check_json(field, item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(field, "has an object key that is not a string")
            check_text(field, key, max_length=2**31, allow_empty=True)
            _check_json(field, item, depth + 1)
        return
    raise InvalidInputError(field, f"is not JSON: {type(value).__name__} is not a JSON type")


def _input_error(exc: ValidationError) -> InvalidInputError:
    first = exc.errors()[0]
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, InvalidInputError):  # raised by our __init__ under model_validate
        return inner
    location = ".".join(str(part) for part in first["loc"]) or "decision"
    return InvalidInputError(location, first["msg"])


class ToolCallDecision(BaseModel):
    """A decision for a suspended tool call, with exactly the seed's JSON shape.

    ``{"target_id", "decision_id", "action": "resume"|"cancel", "result", "reason", "updated_at"}``.
    ``decision_id`` is the idempotency key: a non-empty one is stored at most once per run.
    ``updated_at`` is unix milliseconds. Construction raises :class:`InvalidInputError`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    target_id: str
    decision_id: str = ""
    action: ResumeDecisionAction
    result: JsonValue = None
    reason: str | None = None
    updated_at: int

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _input_error(exc) from exc

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """Validate a mapping into a decision; raise :class:`InvalidInputError` if unfit."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise _input_error(exc) from exc

    @classmethod
    def model_validate_json(
        cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any
    ) -> Self:
        """Parse the seed's JSON shape; raise :class:`InvalidInputError` if it does not fit."""
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as exc:
            raise _input_error(exc) from exc

    @field_validator("action", mode="before")
    @classmethod
    def _action_from_text(cls, value: object) -> object:
        # strict mode would refuse the plain strings that JSON carries
        if isinstance(value, str) and not isinstance(value, ResumeDecisionAction):
            try:
                return ResumeDecisionAction(value)
            except ValueError:
                raise ValueError("must be 'resume' or 'cancel'") from None
        return value

    @field_validator("target_id")
    @classmethod
    def _target_id(cls, value: str) -> str:
        return _plain(check_id, "target_id", value)

    @field_validator("decision_id")
    @classmethod
    def _decision_id(cls, value: str) -> str:
        return _plain(check_text, "decision_id", value, max_length=MAX_ID_LENGTH, allow_empty=True)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _plain(check_text, "reason", value, max_length=MAX_REASON_LENGTH, allow_empty=True)

    @field_validator("result")
    @classmethod
    def _result(cls, value: JsonValue) -> JsonValue:
        try:
            _check_json("result", value)
        except InvalidInputError as exc:
            raise ValueError(exc.reason) from None
        return value

    @field_validator("updated_at")
    @classmethod
    def _updated_at(cls, value: int) -> int:
        if not 0 <= value <= MAX_UPDATED_AT:
            raise ValueError(f"must be between 0 and {MAX_UPDATED_AT}")
        return value

    @classmethod
    def resume(
        cls,
        target_id: str,
        result: JsonValue = None,
        updated_at: int = 0,
        *,
        decision_id: str = "",
    ) -> ToolCallDecision:
        """Build a decision that resumes the suspended call ``target_id`` with ``result``."""
        return cls(
            target_id=target_id,
            decision_id=decision_id,
            action=ResumeDecisionAction.RESUME,
            result=result,
            updated_at=updated_at,
        )

    @classmethod
    def cancel(
        cls,
        target_id: str,
        result: JsonValue = None,
        reason: str | None = None,
        updated_at: int = 0,
        *,
        decision_id: str = "",
    ) -> ToolCallDecision:
        """Build a decision that cancels the suspended call ``target_id``."""
        return cls(
            target_id=target_id,
            decision_id=decision_id,
            action=ResumeDecisionAction.CANCEL,
            result=result,
            reason=reason,
            updated_at=updated_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """The seed's JSON object: ``result`` omitted when null, ``reason`` when absent."""
        data: dict[str, Any] = {
            "target_id": self.target_id,
            "decision_id": self.decision_id,
            "action": self.action.value,
        }
        if self.result is not None:
            data["result"] = self.result
        if self.reason is not None:
            data["reason"] = self.reason
        data["updated_at"] = self.updated_at
        return data

    def to_json(self) -> str:
        """Serialise to the seed's JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def coerce(cls, field: str, value: object) -> ToolCallDecision:
        """Accept a decision or a mapping in its JSON shape; raise naming ``field`` otherwise."""
        if isinstance(value, ToolCallDecision):
            return value
        if isinstance(value, Mapping):
            try:
                return cls.model_validate(dict(value))
            except InvalidInputError as exc:
                raise InvalidInputError(f"{field}.{exc.field}", exc.reason) from exc
        raise InvalidInputError(field, f"expected a ToolCallDecision, got {type(value).__name__}")


def _plain(check: Any, *args: Any, **kwargs: Any) -> str:
    # pydantic wants ValueError from validators; keep our message without the field prefix
    try:
        result: str = check(*args, **kwargs)
    except InvalidInputError as exc:
        raise ValueError(exc.reason) from None
    return result


@dataclass(frozen=True, slots=True)
class ForwardedDecision:
    """Where a forward landed: the thread and the run that now hold the decisions."""

    thread_id: str
    run_id: str


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One row of the ``runs`` table."""

    run_id: str
    thread_id: str
    agent_id: str
    status: RunStatus
    owner_id: str | None
    cancel_requested_at: datetime | None
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    #: the fencing token of the owner this record was read under (see ``LeaseLostError``)
    owner_epoch: int = 1
    #: the stream's last seq (``None``: never bound, or pruned): a resumed body publishes
    #: on from here, with ``after_seq=stream_seq``
    stream_seq: int | None = None
    #: the delivery id of the newest decision acknowledged (0: none): how far a resumed body
    #: had applied its decisions (the inbox redelivers every one not acknowledged)
    decision_cursor: int = 0
    #: when the run was queued behind the thread's active run (``None``: never queued)
    queued_at: datetime | None = None

    @property
    def is_cancelled(self) -> bool:
        """Whether the run was asked to stop: cancelled, superseded, or a cancel is pending."""
        return is_cancelled(self.status, cancel_requested=self.cancel_requested_at is not None)


def is_cancelled(status: RunStatus, *, cancel_requested: bool) -> bool:
    """The one rule for a tripped cancellation token: a cancel was requested, or the run
    ended cancelled or superseded (the seed trips the token on both)."""
    return cancel_requested or status in (RunStatus.CANCELLED, RunStatus.SUPERSEDED)


@dataclass(frozen=True, slots=True)
class DecisionDelivery:
    """A decision handed to a run's inbox; acknowledge it once applied.

    ``delivery_id`` is the decision's row id, increasing in forward order within a run.
    ``attempts`` counts deliveries including this one: more than 1 means a redelivery.
    """

    delivery_id: int
    run_id: str
    decision: ToolCallDecision
    attempts: int
    received_at: datetime
    #: the ``ack`` of the inbox that delivered it (``None`` for a delivery made by hand)
    acknowledge: Callable[[DecisionDelivery], Awaitable[bool]] | None = field(
        default=None, repr=False, compare=False
    )

    async def ack(self) -> bool:
        """Acknowledge this delivery through the inbox that delivered it; see
        ``DecisionInbox.ack`` (same result and errors). Raises :class:`InvalidInputError`
        for a delivery no inbox made."""
        if self.acknowledge is None:
            raise InvalidInputError("delivery", "was not delivered by an inbox")
        return await self.acknowledge(self)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One chunk of a run's output stream; ``seq`` is gapless and increasing per run."""

    seq: int
    data: bytes


# --- argument checks shared by the public calls ------------------------------------------------


def check_decision_batch(
    decisions: object, *, limit: int, max_result_bytes: int
) -> tuple[list[ToolCallDecision], list[str]]:
    """Validate a forward's decisions; return them with each ``result`` encoded once, as stored.

    A decision without ``decision_id`` is given ``registry-<uuid4>``, once per call: a retry of
    that call (after a lost reply) stores nothing twice. Raises :class:`TooManyDecisionsError`
    past ``limit`` decisions and :class:`InvalidInputError` naming ``decisions[i]...`` for
    anything else.
    """
    if isinstance(decisions, str | bytes | Mapping) or not isinstance(decisions, Iterable):
        raise InvalidInputError("decisions", "expected a sequence of decisions")
    batch = list(decisions)
    if len(batch) > limit:
        raise TooManyDecisionsError(len(batch), limit)
    checked = [
        ToolCallDecision.coerce(f"decisions[{index}]", item) for index, item in enumerate(batch)
    ]
    checked = [
        d if d.decision_id else d.model_copy(update={"decision_id": f"registry-{uuid.uuid4()}"})
        for d in checked
    ]
    results = [
        json.dumps(decision.result, ensure_ascii=False, separators=(",", ":"))
        for decision in checked
    ]
    for index, result in enumerate(results):
        size = len(result.encode())
        if size > max_result_bytes:
            raise InvalidInputError(
                f"decisions[{index}].result",
                f"is {size} bytes of JSON; the limit is {max_result_bytes}",
            )
    return checked, results


def check_chunks(chunks: object, *, max_chunk_bytes: int) -> list[bytes]:
    """Validate chunks to publish: a sequence of bytes-like objects of at most
    ``max_chunk_bytes`` each; return them as ``bytes``."""
    if isinstance(chunks, bytes | bytearray | memoryview | str) or not isinstance(chunks, Iterable):
        raise InvalidInputError("chunks", "expected a sequence of bytes objects")
    batch: list[bytes] = []
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidInputError(
                f"chunks[{index}]", f"expected bytes, got {type(chunk).__name__}"
            )
        data = bytes(chunk)
        if len(data) > max_chunk_bytes:
            raise InvalidInputError(
                f"chunks[{index}]", f"is {len(data)} bytes; the limit is {max_chunk_bytes}"
            )
        batch.append(data)
    return batch


def check_count(field: str, value: object, *, minimum: int, maximum: int = MAX_BIGINT) -> int:
    """Validate an integer argument from ``minimum`` to ``maximum`` (default
    :data:`MAX_BIGINT`: a larger one would reach the server as a driver error; ``bool`` is
    refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise InvalidInputError(field, f"must be {what}, at most {maximum}")
    return value


def check_after_seq(value: object) -> int | None:
    """Validate a subscription's starting point: ``None`` or an integer from 0 to
    :data:`MAX_BIGINT`."""
    return None if value is None else check_count("after_seq", value, minimum=0)


def check_timeout(value: object) -> float | None:
    """Validate a ``timeout`` argument: ``None`` or a non-negative number of seconds
    (``bool`` and NaN are refused)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidInputError("timeout", "must be a non-negative number of seconds or None")
    return value


_Choice = TypeVar("_Choice", bound=enum.StrEnum)


def check_choice(field: str, value: object, choices: type[_Choice]) -> _Choice:
    """Validate one of the values of the enum ``choices`` (the member or its text)."""
    if isinstance(value, str):
        try:
            return choices(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(choice.value) for choice in choices)
    raise InvalidInputError(field, f"must be one of {allowed}, got {value!r}")


#: Longest ``reason`` a run's outcome keeps (a longer one is cut, never refused).
MAX_END_REASON_LENGTH = 2000


def end_reason(reason: object) -> str | None:
    """Validate the reason given to ``finish``: ``None`` or text, cut to
    :data:`MAX_END_REASON_LENGTH` characters."""
    if reason is None:
        return None
    if isinstance(reason, str):
        reason = reason[:MAX_END_REASON_LENGTH]
    return check_text("reason", reason, max_length=MAX_END_REASON_LENGTH, allow_empty=True)


def failure_summary(exc: BaseException) -> str:
    """The reason a run scope records for a run whose body raised ``exc``: its type and first
    line, cut to :data:`MAX_END_REASON_LENGTH` characters (NUL and lone surrogates replaced)."""
    text = str(exc).strip().splitlines()
    summary = type(exc).__name__ + (f": {text[0]}" if text else "")
    summary = summary.replace("\x00", "\ufffd")
    summary = summary.encode("utf-8", "replace").decode("utf-8")
    return summary[:MAX_END_REASON_LENGTH]
