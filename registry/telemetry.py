"""OpenTelemetry spans and metrics of the registry's public calls (the ``otel`` extra).

Optional: without ``opentelemetry-api`` importable nothing is imported or wrapped (:func:`traced`
returns the function it is given, the recording functions return at once). With it, the
registry speaks through OpenTelemetry's API only, so spans and metrics go wherever the
application configured its SDK (the global providers, or those given to :func:`configure`);
an application that configured none pays for the API's no-op objects alone.

Spans follow OpenTelemetry's database semantic conventions where they apply: kind ``CLIENT``,
named ``"{db.operation.name} {db.namespace}"``, with ``db.system.name`` (``postgresql``),
``db.operation.name`` (the call: ``register``, ``claim_decisions``, ...), ``db.namespace``,
``server.address`` and ``server.port``, plus ``registry.run_id``, ``registry.thread_id`` and
``registry.worker_id``. A call that raises ends its span with status ``ERROR``, the exception
recorded and ``error.type`` set. The metrics and their names are listed in the README
("Telemetry").
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from registry.distribution import installed_version

try:
    from opentelemetry import context, metrics, trace
except ImportError:  # the ``otel`` extra is not installed: telemetry is off
    ENABLED = False
else:
    ENABLED = True

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Span, TracerProvider

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])
_Value = str | int

#: the instrumentation scope of the registry's tracer and meter
SCOPE = "registry"
#: ``db.system.name``
SYSTEM = "postgresql"
#: bucket bounds of the latency histograms, seconds (the SDK's default ones are for ms)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Target:
    """What one registry's spans and data points say of the database and of the worker: the
    attributes ``db.system.name``, ``db.namespace``, ``server.address``, ``server.port`` and
    ``registry.worker_id`` (those known)."""

    __slots__ = ("attributes", "namespace", "worker_id")

    def __init__(
        self,
        *,
        namespace: str | None = None,
        address: str | None = None,
        port: int | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.worker_id = worker_id
        given: dict[str, _Value | None] = {
            "db.system.name": SYSTEM,
            "db.namespace": namespace,
            "server.address": address,
            "server.port": port,
            "registry.worker_id": worker_id,
        }
        #: the attributes, without those not known
        self.attributes: Mapping[str, _Value] = {
            name: value for name, value in given.items() if value is not None
        }

    def span_name(self, operation: str) -> str:
        """``"{db.operation.name} {db.namespace}"``, as the conventions name a span."""
        return operation if self.namespace is None else f"{operation} {self.namespace}"


class Traced(Protocol):
    """What a class whose methods are :func:`traced` provides."""

    @property
    def telemetry_target(self) -> Target: ...


class Delivered(Protocol):
    """A delivery as the claim metrics read it (``models.DecisionDelivery``)."""

    @property
    def attempts(self) -> int: ...

    @property
    def received_at(self) -> datetime: ...


class HeldRuns(Protocol):
    """What the ``registry.runs.held`` gauge reads (``upkeep.LeaseKeeper``)."""

    def held(self) -> Mapping[str, int]: ...


#: the counters: the key each recording function uses, and the name, unit and description
COUNTERS = {
    "forwards": (
        "registry.forwards",
        "{forward}",
        "Forwards of decisions, by target (registry.forward.by) and landing"
        " (registry.forward.landed)",
    ),
    "claimed": ("registry.decisions.claimed", "{decision}", "Decisions claimed by inboxes"),
    "redelivered": (
        "registry.decisions.redelivered",
        "{decision}",
        "Decisions claimed again (attempts > 1): an inbox before did not acknowledge them",
    ),
    "dead_lettered": (
        "registry.decisions.dead_lettered",
        "{decision}",
        "Decisions dropped after max_delivery_attempts deliveries without an ack",
    ),
    "acknowledged": ("registry.decisions.acknowledged", "{decision}", "Deliveries acknowledged"),
    "reconnects": (
        "registry.listener.reconnects",
        "{reconnect}",
        "LISTEN connections re-established after a loss",
    ),
}


class _Instruments:
    """The tracer and the metric instruments, from one pair of providers."""

    def __init__(
        self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        version = installed_version()
        self.tracer = trace.get_tracer(SCOPE, version, tracer_provider)
        meter = metrics.get_meter(SCOPE, version, meter_provider)
        self.counters = {
            key: meter.create_counter(name, unit, description)
            for key, (name, unit, description) in COUNTERS.items()
        }
        self.delivery_latency = meter.create_histogram(
            "registry.decision.delivery.duration",
            "s",
            "From a decision's forward (its received_at, the server's clock) to its first"
            " claim by an inbox",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        meter.create_observable_gauge(
            "registry.runs.held", [_observe_held], "{run}", "Active runs this registry holds"
        )


#: the registries whose held runs the gauge reports, with their target
_HELD: weakref.WeakKeyDictionary[HeldRuns, Target] = weakref.WeakKeyDictionary()


def _observe_held(_options: CallbackOptions) -> Iterable[Observation]:
    return [
        metrics.Observation(len(runs.held()), target.attributes)
        for runs, target in list(_HELD.items())
    ]


_instruments = _Instruments(None, None) if ENABLED else None


def configure(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Send the registry's spans and metrics to these providers rather than OpenTelemetry's
    global ones (``None``: the global one again).

    Process-wide, for every registry. For an application that keeps its providers out of the
    global ones, and for tests: the global providers can be set only once per process. Does
    nothing without ``opentelemetry-api``.
    """
    global _instruments
    if ENABLED:
        _instruments = _Instruments(tracer_provider, meter_provider)


def traced(operation: str, **ids: str) -> Callable[[_F], _F]:
    """Decorate an async method of a :class:`Traced` class: each call is a span named after
    ``operation`` (see the module), current while the call runs.

    ``ids`` maps ``run_id`` and ``thread_id`` to where the call holds them: a parameter's name,
    or a dotted path from one (``"self.run_id"``, ``"lease.run_id"``); a value that is not
    text is left out. Raises ``ValueError`` at decoration for a path from no parameter.
    Without ``opentelemetry-api``, returns ``method`` itself.
    """

    def decorate(method: _F) -> _F:
        if not ENABLED:
            return method
        getters = {f"registry.{name}": _getter(method, path) for name, path in ids.items()}

        @functools.wraps(method)
        async def call(self: Traced, *args: Any, **kwargs: Any) -> Any:
            attributes = dict(self.telemetry_target.attributes)
            attributes["db.operation.name"] = operation
            for name, get in getters.items():
                value = get(self, args, kwargs)
                if isinstance(value, str):
                    attributes[name] = value
            assert _instruments is not None
            with _instruments.tracer.start_as_current_span(
                self.telemetry_target.span_name(operation),
                kind=trace.SpanKind.CLIENT,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await method(self, *args, **kwargs)
                except BaseException as exc:
                    _fail(span, exc)
                    raise

        return cast(_F, call)

    return decorate


def _getter(
    method: Callable[..., Any], path: str
) -> Callable[[object, tuple[Any, ...], dict[str, Any]], object]:
    root, *names = path.split(".")
    parameters = list(inspect.signature(method).parameters.values())
    index = next((i for i, p in enumerate(parameters) if p.name == root), None)
    if index is None:
        raise ValueError(f"{method.__qualname__} has no parameter {root!r} (telemetry: {path})")
    default = parameters[index].default
    default = None if default is inspect.Parameter.empty else default

    def get(self: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        if index == 0:
            value: object = self
        elif root in kwargs:
            value = kwargs[root]
        else:
            value = args[index - 1] if index - 1 < len(args) else default
        for name in names:
            value = getattr(value, name, None)
        return value

    return get


def _fail(span: Span, exc: BaseException) -> None:
    span.set_attribute("error.type", type(exc).__qualname__)
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__qualname__))


def annotate(**ids: str | None) -> None:
    """Add ``registry.<name>`` attributes (``run_id``, ``thread_id``) learnt during a call to
    the current span (a forward by thread learns its run); ``None`` values are left out."""
    if ENABLED:
        span = trace.get_current_span()
        for name, value in ids.items():
            if value is not None:
                span.set_attribute(f"registry.{name}", value)


class RunSpan:
    """The span of a run scope's block (``run``): open and current from the scope's enter to
    its exit, in the task that runs the block; the spans of the body's calls are its children.
    """

    __slots__ = ("_span", "_token")

    def __init__(self, target: Target, *, run_id: str, thread_id: str) -> None:
        self._span: Span | None = None
        self._token: Token[Context] | None = None
        if _instruments is None:
            return
        attributes = dict(target.attributes)
        attributes.update(
            {"db.operation.name": "run", "registry.run_id": run_id, "registry.thread_id": thread_id}
        )
        self._span = _instruments.tracer.start_span(
            target.span_name("run"), kind=trace.SpanKind.INTERNAL, attributes=attributes
        )
        self._token = context.attach(trace.set_span_in_context(self._span))

    def end(self, error: BaseException | None) -> None:
        """End the span (status ``ERROR`` with ``error`` recorded, when given). Idempotent."""
        span, self._span = self._span, None
        if span is None:
            return
        if self._token is not None:
            context.detach(self._token)
        if error is not None:
            _fail(span, error)
        span.end()


# --- metrics ---------------------------------------------------------------------------------


def forwarded(target: Target, *, by: str, landed: bool) -> None:
    """Count a forward (``registry.forwards``) made ``by`` ``"run_id"`` or ``"thread_id"``;
    ``landed``: a run took its decisions."""
    if _instruments is not None:
        _instruments.counters["forwards"].add(
            1, {**target.attributes, "registry.forward.by": by, "registry.forward.landed": landed}
        )


def claimed(target: Target, deliveries: Sequence[Delivered], dead_lettered: int) -> None:
    """Count a claim's deliveries, redeliveries and dead letters, and record the delivery
    latency of the first deliveries (``received_at``, the server's clock, to now)."""
    if _instruments is None or not (deliveries or dead_lettered):
        return
    attributes = target.attributes
    redelivered = sum(1 for delivery in deliveries if delivery.attempts > 1)
    _instruments.counters["claimed"].add(len(deliveries), attributes)
    if redelivered:
        _instruments.counters["redelivered"].add(redelivered, attributes)
    if dead_lettered:
        _instruments.counters["dead_lettered"].add(dead_lettered, attributes)
    now = datetime.now(UTC)
    for delivery in deliveries:
        if delivery.attempts == 1:
            # the clocks of two machines: never below zero
            latency = max(0.0, (now - delivery.received_at).total_seconds())
            _instruments.delivery_latency.record(latency, attributes)


def acknowledged(target: Target) -> None:
    """Count an acknowledgement that was recorded."""
    if _instruments is not None:
        _instruments.counters["acknowledged"].add(1, target.attributes)


def reconnected(target: Target) -> None:
    """Count a LISTEN connection re-established after a loss."""
    if _instruments is not None:
        _instruments.counters["reconnects"].add(1, target.attributes)


def watch_held_runs(runs: HeldRuns, target: Target) -> None:
    """Report the runs ``runs`` holds in the ``registry.runs.held`` gauge until
    :func:`forget_held_runs` (or until ``runs`` is garbage)."""
    if ENABLED:
        _HELD[runs] = target


def forget_held_runs(runs: HeldRuns) -> None:
    """Stop reporting ``runs`` (the registry closed)."""
    _HELD.pop(runs, None)


def log_fields(
    run_id: str, thread_id: str | None = None, worker_id: str | None = None
) -> dict[str, str]:
    """The ids a log record of a run carries as structured fields (``extra=``): ``run_id``,
    and ``thread_id`` and ``worker_id`` when known."""
    fields = {"run_id": run_id, "thread_id": thread_id, "worker_id": worker_id}
    return {name: value for name, value in fields.items() if value is not None}
