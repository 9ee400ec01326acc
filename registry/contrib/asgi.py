"""The registry over HTTP, on Starlette: routes, a lifespan, a dependency, error mapping.

Install with the ``asgi`` extra. In a FastAPI (or Starlette) app::

    lifespan = RegistryLifespan(URL, carry_on=carry_on)   # resume, adopt, close
    app = FastAPI(lifespan=lifespan)
    app.mount("/registry", registry_routes(authorize=check_agent))
    add_exception_handlers(app)

The routes (relative to the mount point; JSON unless a stream):

=======================================  ======================================================
``POST /threads/{thread_id}/decisions``  forward to the thread's active run of ``?agent_id=``
``POST /runs/{run_id}/decisions``        forward to the active run ``run_id``
``POST /threads/{thread_id}/cancel``     cancel the thread's active run of ``?agent_id=``
``POST /runs/{run_id}/cancel``           cancel the run (active or queued)
``GET /runs/{run_id}``                   the run's record (any status)
``GET /runs/{run_id}/events``            the stream, plain SSE (resume: ``Last-Event-ID``)
``GET /runs/{run_id}/agui``              the stream, AG-UI framing
``GET /threads/{thread_id}/stream``      the AI SDK resume: the thread's active run's stream
                                         from its start, or 204 when there is none
=======================================  ======================================================

A forward's body is ``{"decisions": [...]}`` (or the list alone), each decision in the
registry's JSON shape; it answers ``{"thread_id", "run_id"}``. Streams answer 404 when the run
has no stream (never bound, or pruned). A client that disconnects ends its stream only: the
run goes on. The server's shutdown ends every stream at once (sse-starlette sees uvicorn's
exit signal; the subscription is closed with the response, and the registry's close ends any
left). Each request's agent id passes through the ``authorize`` hook given to
:func:`registry_routes`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from registry import (
    DatabaseUnavailableError,
    InvalidInputError,
    RegistryClosedError,
    RegistryError,
    RunRecord,
    RunRegistry,
    StreamSubscription,
    ThreadBusyError,
)
from registry.contrib.framing import (
    UI_MESSAGE_DONE,
    UI_MESSAGE_STREAM_HEADER,
    agui_event,
    end_event,
    plain_event,
    resume_point,
    ui_message_event,
)
from registry.contrib.lifespan import CarryOn, RegistryLifespan
from registry.models import StreamChunk

logger = logging.getLogger(__name__)

#: ``authorize(request, agent_id)``: the agent id the request may act as, or ``None`` to refuse
#: (403). ``agent_id`` is the one the request names (``?agent_id=``; ``None`` when it names
#: none) for the routes by thread, and the run's owner for the routes by run id.
Authorize = Callable[[Request, str | None], Awaitable[str | None]]

#: seconds a client is told to wait (``Retry-After``) when the database does not answer
RETRY_AFTER_SECONDS = 1


class RunNotFoundError(LookupError):
    """No such run, no active run, or no stream for the request (answered 404)."""


class AgentRefusedError(PermissionError):
    """The ``authorize`` hook refused the request's agent (answered 403)."""


async def named_agent(request: Request, agent_id: str | None) -> str | None:
    """The default ``authorize``: every request acts as the agent it names.

    Raises :class:`InvalidInputError` (422) when a route by thread names none.
    """
    if agent_id is None:
        raise InvalidInputError("agent_id", "is required: name the agent as ?agent_id=")
    return agent_id


# --- app state: the registry and the open streams ----------------------------------------------


class OpenStreams:
    """The stream subscriptions this app is serving now (for shutdown checks and metrics)."""

    def __init__(self) -> None:
        self._subscriptions: set[StreamSubscription] = set()

    def __len__(self) -> int:
        return len(self._subscriptions)

    def add(self, subscription: StreamSubscription) -> None:
        """Count ``subscription`` in until :meth:`discard`."""
        self._subscriptions.add(subscription)

    def discard(self, subscription: StreamSubscription) -> None:
        """Count ``subscription`` out (idempotent)."""
        self._subscriptions.discard(subscription)


def get_run_registry(request: Request) -> RunRegistry:
    """The app's registry, set by :class:`RegistryLifespan` (a FastAPI dependency:
    ``runs: RunRegistry = Depends(get_run_registry)``).

    Raises :class:`RegistryClosedError` (503) when the app has none (not started, or shut down).
    """
    runs = getattr(request.app.state, "run_registry", None)
    if not isinstance(runs, RunRegistry) or runs.closed:
        raise RegistryClosedError("the app has no open registry (RegistryLifespan sets one)")
    return runs


def open_streams(app: Any) -> OpenStreams:
    """The app's :class:`OpenStreams` (made on first use)."""
    streams = getattr(app.state, "run_streams", None)
    if not isinstance(streams, OpenStreams):
        streams = OpenStreams()
        app.state.run_streams = streams
    return streams


# --- error mapping -----------------------------------------------------------------------------


def _error(status: int, kind: str, exc: Exception, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": str(exc), **fields}, status_code=status)


async def _invalid_input(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInputError)
    return _error(422, "invalid_input", exc, field=exc.field, reason=exc.reason)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "not_found", exc)


async def _refused(request: Request, exc: Exception) -> Response:
    return _error(403, "forbidden", exc)


async def _busy(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ThreadBusyError)
    return _error(409, "thread_busy", exc, thread_id=exc.thread_id, active_run_id=exc.active_run_id)


async def _unavailable(request: Request, exc: Exception) -> Response:
    response = _error(503, "unavailable", exc)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


#: the status each error maps to: InvalidInputError 422, RunNotFoundError 404,
#: AgentRefusedError 403, ThreadBusyError 409, DatabaseUnavailableError and
#: RegistryClosedError 503 with ``Retry-After``; for ``Starlette(exception_handlers=...)``
EXCEPTION_HANDLERS: Mapping[type[Exception], Callable[[Request, Exception], Awaitable[Response]]]
EXCEPTION_HANDLERS = {
    InvalidInputError: _invalid_input,
    RunNotFoundError: _not_found,
    AgentRefusedError: _refused,
    ThreadBusyError: _busy,
    DatabaseUnavailableError: _unavailable,
    RegistryClosedError: _unavailable,
}


def add_exception_handlers(app: Any) -> None:
    """Install :data:`EXCEPTION_HANDLERS` on a Starlette or FastAPI ``app``."""
    for exc_class, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)


# --- streams -----------------------------------------------------------------------------------


class _StreamResponse(EventSourceResponse):
    """An SSE response over one subscription, which it closes however the response ends
    (the run ended, the client went away, the server shuts down).

    On the server's shutdown (sse-starlette's ``shutdown_event``) the subscription is closed,
    so the events end and the response completes cleanly, without an end event: the client
    reconnects (elsewhere) and resumes. sse-starlette cancels it after ``SHUTDOWN_GRACE``.
    """

    def __init__(
        self,
        subscription: StreamSubscription,
        frames: Framer,
        streams: OpenStreams,
        *,
        ping: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._shutdown = anyio.Event()
        self._events = frames(subscription, self._shutdown.is_set)
        super().__init__(
            self._events,
            ping=ping,
            headers=headers,
            shutdown_event=self._shutdown,
            shutdown_grace_period=SHUTDOWN_GRACE,
        )
        self._subscription = subscription
        self._streams = streams

    async def _close_on_shutdown(self) -> None:
        await self._shutdown.wait()
        await self._subscription.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._streams.add(self._subscription)
        closer = asyncio.create_task(self._close_on_shutdown())
        try:
            await super().__call__(scope, receive, send)
        finally:
            closer.cancel()
            self._streams.discard(self._subscription)
            await self._subscription.aclose()
            await self._events.aclose()


#: seconds a stream may take to end after the server's shutdown began, before sse-starlette
#: cancels it (the subscription ends at the shutdown; this bounds a database read in flight)
SHUTDOWN_GRACE = 2.0

#: ``frames(subscription, stopped)``: the events of a stream; ``stopped()`` tells a shutdown
Framer = Callable[[StreamSubscription, Callable[[], bool]], AsyncGenerator[ServerSentEvent, None]]


def _framer(
    frame: Callable[[StreamChunk], ServerSentEvent],
    last: Callable[[], Awaitable[ServerSentEvent | None]],
) -> Framer:
    async def frames(
        subscription: StreamSubscription, stopped: Callable[[], bool]
    ) -> AsyncGenerator[ServerSentEvent, None]:
        try:
            async for chunk in subscription:
                yield frame(chunk)
        except RegistryClosedError:
            return  # the registry closed: the run did not end here, the client resumes
        if stopped():
            return  # the server is going down: no end event either
        try:
            closing = await last()
        except RegistryError:
            # the client reconnects with its Last-Event-ID and gets the end event then
            logger.warning("could not read how run %s ended", subscription.run_id, exc_info=True)
            return
        if closing is not None:
            yield closing

    return frames


class _Routes:
    """The route endpoints, sharing the ``authorize`` hook and the ping interval."""

    def __init__(self, authorize: Authorize, ping: float) -> None:
        self._authorize = authorize
        self._ping = ping

    async def _agent_of_thread(self, request: Request) -> str:
        agent_id = await self._authorize(request, request.query_params.get("agent_id"))
        if agent_id is None:
            raise AgentRefusedError("the request may not act for this agent")
        return agent_id

    async def _run_record(self, request: Request, runs: RunRegistry) -> RunRecord:
        run_id = request.path_params["run_id"]
        record = await runs.run(run_id)
        if record is None:
            raise RunNotFoundError(f"no run {run_id!r}")
        if await self._authorize(request, record.agent_id) != record.agent_id:
            raise AgentRefusedError(f"the request may not act for the agent of run {run_id!r}")
        return record

    async def forward_by_thread(self, request: Request) -> Response:
        runs = get_run_registry(request)
        agent_id = await self._agent_of_thread(request)
        thread_id = request.path_params["thread_id"]
        decisions = await _decisions_body(request)
        forwarded = await runs.forward_decisions_by_thread(agent_id, thread_id, decisions)
        if forwarded is None:
            raise RunNotFoundError(f"thread {thread_id!r} has no active run of this agent")
        return JSONResponse({"thread_id": forwarded.thread_id, "run_id": forwarded.run_id})

    async def forward_by_run(self, request: Request) -> Response:
        runs = get_run_registry(request)
        record = await self._run_record(request, runs)
        decisions = await _decisions_body(request)
        forwarded = await runs.forward_decisions_by_run_id(record.run_id, decisions)
        if forwarded is None:
            raise RunNotFoundError(f"run {record.run_id!r} is not active")
        return JSONResponse({"thread_id": forwarded.thread_id, "run_id": forwarded.run_id})

    async def cancel_by_thread(self, request: Request) -> Response:
        runs = get_run_registry(request)
        agent_id = await self._agent_of_thread(request)
        thread_id = request.path_params["thread_id"]
        run_id = await runs.cancel_active_run_by_thread(thread_id, agent_id=agent_id)
        if run_id is None:
            raise RunNotFoundError(f"thread {thread_id!r} has no active run of this agent")
        return JSONResponse({"run_id": run_id}, status_code=202)

    async def cancel_by_run(self, request: Request) -> Response:
        runs = get_run_registry(request)
        record = await self._run_record(request, runs)
        if not await runs.cancel_active_run_by_id(record.run_id):
            raise RunNotFoundError(f"run {record.run_id!r} is neither active nor queued")
        return JSONResponse({"run_id": record.run_id}, status_code=202)

    async def run_state(self, request: Request) -> Response:
        record = await self._run_record(request, get_run_registry(request))
        return JSONResponse(record_json(record))

    async def _subscribe(self, runs: RunRegistry, run_id: str, after: int) -> StreamSubscription:
        subscription = await runs.subscribe_thread_run_stream(run_id, after_seq=after)
        if subscription is None:
            raise RunNotFoundError(f"run {run_id!r} has no stream")
        return subscription

    async def plain_stream(self, request: Request) -> Response:
        runs = get_run_registry(request)
        record = await self._run_record(request, runs)
        after = resume_point(
            request.headers.get("last-event-id"), request.query_params.get("after")
        )
        subscription = await self._subscribe(runs, record.run_id, after)

        async def last() -> ServerSentEvent:
            return end_event(await runs.run(record.run_id))

        frames = _framer(plain_event, last)
        return _StreamResponse(subscription, frames, open_streams(request.app), ping=self._ping)

    async def agui_stream(self, request: Request) -> Response:
        runs = get_run_registry(request)
        record = await self._run_record(request, runs)
        subscription = await self._subscribe(runs, record.run_id, 0)
        frames = _framer(lambda chunk: agui_event(chunk, record.run_id), _nothing)
        return _StreamResponse(subscription, frames, open_streams(request.app), ping=self._ping)

    async def ui_message_resume(self, request: Request) -> Response:
        runs = get_run_registry(request)
        agent_id = await self._agent_of_thread(request)
        handle = await runs.handle_by_thread(request.path_params["thread_id"], agent_id=agent_id)
        if handle is None:
            return Response(status_code=204)
        subscription = await runs.subscribe_thread_run_stream(handle.run_id, after_seq=0)
        if subscription is None:
            return Response(status_code=204)  # nothing published yet: nothing to resume
        run_id = handle.run_id

        async def done() -> ServerSentEvent:
            return UI_MESSAGE_DONE

        frames = _framer(lambda chunk: ui_message_event(chunk, run_id), done)
        return _StreamResponse(
            subscription,
            frames,
            open_streams(request.app),
            ping=self._ping,
            headers=dict([UI_MESSAGE_STREAM_HEADER]),
        )


async def _nothing() -> None:
    return None


async def _decisions_body(request: Request) -> list[Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidInputError("body", 'expected JSON: {"decisions": [...]}') from exc
    if isinstance(body, dict):
        if set(body) != {"decisions"}:
            raise InvalidInputError("body", 'expected one key, "decisions"')
        body = body["decisions"]
    if not isinstance(body, list):
        raise InvalidInputError("decisions", "expected a list of decisions")
    return body


def record_json(record: RunRecord) -> dict[str, Any]:
    """The run record as JSON: its fields by name, times in ISO 8601, the status by value."""

    def plain(value: object) -> object:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, enum.Enum):
            return value.value
        return value

    return {key: plain(value) for key, value in dataclasses.asdict(record).items()}


def registry_routes(*, authorize: Authorize = named_agent, ping: float = 15.0) -> Router:
    """The routes of the module docstring, as a Starlette ``Router``.

    Mount it (``app.mount("/registry", registry_routes())``) in a Starlette or FastAPI app
    whose lifespan is a :class:`RegistryLifespan` (or that sets ``app.state.run_registry``), and
    add :data:`EXCEPTION_HANDLERS`. ``authorize`` resolves and checks the agent of each request
    (see :data:`Authorize`); ``ping`` is the keep-alive comment interval of the streams, in
    seconds (0: none).
    """
    routes = _Routes(authorize, ping)
    return Router(
        routes=[
            Route("/threads/{thread_id}/decisions", routes.forward_by_thread, methods=["POST"]),
            Route("/runs/{run_id}/decisions", routes.forward_by_run, methods=["POST"]),
            Route("/threads/{thread_id}/cancel", routes.cancel_by_thread, methods=["POST"]),
            Route("/runs/{run_id}/cancel", routes.cancel_by_run, methods=["POST"]),
            Route("/runs/{run_id}", routes.run_state, methods=["GET"]),
            Route("/runs/{run_id}/events", routes.plain_stream, methods=["GET"]),
            Route("/runs/{run_id}/agui", routes.agui_stream, methods=["GET"]),
            Route("/threads/{thread_id}/stream", routes.ui_message_resume, methods=["GET"]),
        ]
    )


__all__ = [
    "EXCEPTION_HANDLERS",
    "SHUTDOWN_GRACE",
    "AgentRefusedError",
    "Authorize",
    "CarryOn",
    "OpenStreams",
    "RegistryLifespan",
    "RunNotFoundError",
    "add_exception_handlers",
    "get_run_registry",
    "named_agent",
    "open_streams",
    "record_json",
    "registry_routes",
]
