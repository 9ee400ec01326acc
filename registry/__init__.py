"""Durable, cross-process registry of an agent runtime's active runs, on PostgreSQL.

Runs and their pending tool-call decisions are rows; LISTEN/NOTIFY wakes whichever process
holds a run or waits on it. Start with :meth:`RunRegistry.connect` after :func:`migrate`.
"""

from registry.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    InvalidInputError,
    LeaseLostError,
    OutcomeUnknownError,
    RegistryClosedError,
    RegistryError,
    RunAlreadyExistsError,
    RunCancelledError,
    RunEndedError,
    RunNotStartedError,
    SchemaNotReadyError,
    StreamClosedError,
    StreamConflictError,
    ThreadBusyError,
    TooManyDecisionsError,
)
from registry.handle import RunCancellationToken, RunHandle
from registry.inbox import DecisionInbox
from registry.locate import resolve_database_url
from registry.models import (
    ConflictPolicy,
    DecisionDelivery,
    DecisionStatus,
    ForwardedDecision,
    ResumeDecisionAction,
    RunOutcome,
    RunRecord,
    RunStatus,
    StreamChunk,
    ToolCallDecision,
)
from registry.registry import RunRegistry
from registry.schema import downgrade, migrate
from registry.scope import RunScope
from registry.settings import RegistrySettings
from registry.streams import StreamSubscription

__all__ = [
    "ConflictPolicy",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DecisionDelivery",
    "DecisionInbox",
    "DecisionStatus",
    "ForwardedDecision",
    "InvalidInputError",
    "LeaseLostError",
    "OutcomeUnknownError",
    "RegistryClosedError",
    "RegistryError",
    "RegistrySettings",
    "ResumeDecisionAction",
    "RunAlreadyExistsError",
    "RunCancellationToken",
    "RunCancelledError",
    "RunEndedError",
    "RunHandle",
    "RunNotStartedError",
    "RunOutcome",
    "RunRecord",
    "RunRegistry",
    "RunScope",
    "RunStatus",
    "SchemaNotReadyError",
    "StreamChunk",
    "StreamClosedError",
    "StreamConflictError",
    "StreamSubscription",
    "ThreadBusyError",
    "TooManyDecisionsError",
    "ToolCallDecision",
    "downgrade",
    "migrate",
    "resolve_database_url",
]
