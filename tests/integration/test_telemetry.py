"""Telemetry: the spans and metrics of public calls, read from the OpenTelemetry SDK's in-memory
exporter and reader, against the real database; and no cost when OpenTelemetry is absent.

Each test hands its own SDK providers to ``telemetry.configure`` (and gives the global ones
back after): OpenTelemetry's global providers can be set only once per process, so a test
that set them would leak its exporter into every test after it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from registry import RegistrySettings, RunRegistry, ThreadBusyError, ToolCallDecision, telemetry
from registry.database import asyncpg_dsn

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

DEADLINE = 5.0


@dataclass
class Recorded:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self, operation: str) -> list[ReadableSpan]:
        return [
            span
            for span in self.spans.get_finished_spans()
            if span.attributes is not None and span.attributes["db.operation.name"] == operation
        ]

    def one(self, operation: str) -> ReadableSpan:
        [span] = self.finished(operation)
        return span

    def points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def total(self, name: str, **attributes: object) -> int:
        return sum(
            point.value
            for point in self.points(name)
            if all(point.attributes.get(key) == value for key, value in attributes.items())
        )


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield Recorded(spans, reader)
    finally:
        telemetry.configure()
        tracer_provider.shutdown()
        meter_provider.shutdown()


@pytest.fixture
def registry_settings() -> RegistrySettings:
    # a decision delivered twice without an ack is dead-lettered at the next claim
    return RegistrySettings(max_delivery_attempts=2)


def decision(decision_id: str) -> ToolCallDecision:
    return ToolCallDecision(
        target_id="call-1", decision_id=decision_id, action="resume", updated_at=1
    )


async def test_public_calls_are_client_spans_named_and_attributed_per_the_conventions(
    run_registry: RunRegistry, registry_database_url: str, recorded: Recorded
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.forward_decisions_by_run_id("run-1", [decision("d1")])
    assert await run_registry.forward_decisions_by_thread("agent-a", "thread-1", [decision("d2")])
    async with handle.decisions() as inbox:
        delivery = await inbox.get(timeout=DEADLINE)
        assert await delivery.ack()
    assert await handle.bind_stream_fanout()
    assert await handle.publish(b"one") == 1
    assert await handle.publish_many([b"two", b"three"]) == [2, 3]
    assert await run_registry.subscribe_thread_run_stream("run-1") is not None
    assert await run_registry.cancel_active_run_by_thread("thread-1") == "run-1"
    assert await run_registry.cancel_active_run_by_id("run-1")
    assert await run_registry.resume_owned_runs() != []
    assert await run_registry.adopt_orphaned_runs() == []

    parts = urllib.parse.urlsplit(registry_database_url)
    database = parts.path.lstrip("/")
    register = recorded.one("register")
    assert register.name == f"register {database}"
    assert register.kind is SpanKind.CLIENT
    assert register.status.status_code is StatusCode.UNSET
    assert register.attributes is not None
    assert register.attributes["db.system.name"] == "postgresql"
    assert register.attributes["db.namespace"] == database
    if parts.hostname is not None:  # else a Unix socket, in the query
        assert register.attributes["server.address"] == parts.hostname
        assert register.attributes["server.port"] == (parts.port or 5432)
    assert register.attributes["registry.run_id"] == "run-1"
    assert register.attributes["registry.thread_id"] == "thread-1"
    assert register.attributes["registry.worker_id"] == "test-worker"
    # a forward by thread learns its run; the handle's and the inbox's calls name theirs
    by_thread = recorded.one("forward_decisions_by_thread").attributes
    assert by_thread is not None
    assert (by_thread["registry.thread_id"], by_thread["registry.run_id"]) == ("thread-1", "run-1")
    for operation in (
        "forward_decisions_by_run_id",
        "claim_decisions",
        "ack_decision",
        "bind_thread_run_stream_fanout",
        "publish",
        "publish_many",
        "subscribe_thread_run_stream",
        "cancel_active_run_by_thread",
        "cancel_active_run_by_id",
    ):
        spans = recorded.finished(operation)
        assert spans, operation
        assert all(s.attributes and s.attributes["registry.run_id"] == "run-1" for s in spans)
    # publish is one span, not one with publish_many's inside
    assert len(recorded.finished("publish_many")) == 1
    assert recorded.one("resume_owned_runs").attributes["registry.worker_id"] == "test-worker"  # type: ignore[index]
    assert recorded.one("adopt_orphaned_runs").kind is SpanKind.CLIENT


async def test_a_failing_call_ends_its_span_in_error_with_the_exception(
    run_registry: RunRegistry, recorded: Recorded
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    with pytest.raises(ThreadBusyError):
        await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="reject")

    ok, refused = recorded.finished("register")
    assert ok.status.status_code is StatusCode.UNSET
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes is not None
    assert refused.attributes["error.type"] == "ThreadBusyError"
    assert refused.attributes["registry.run_id"] == "run-2"
    [event] = refused.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert str(event.attributes["exception.type"]).endswith("ThreadBusyError")


async def test_a_run_scope_is_a_span_around_its_body_and_records_a_failure(
    run_registry: RunRegistry, recorded: Recorded
) -> None:
    async with run_registry.run("run-1", "agent-a", "thread-1") as run:
        await run.bind_stream_fanout()
        await run.publish(b"chunk")
    with pytest.raises(KeyError):
        async with run_registry.run("run-2", "agent-a", "thread-1"):
            raise KeyError("boom")

    completed, failed = recorded.finished("run")
    assert completed.status.status_code is StatusCode.UNSET
    assert completed.attributes is not None
    assert completed.attributes["registry.run_id"] == "run-1"
    assert completed.context is not None
    # the body's calls and the outcome's write are the run's children
    publish = recorded.one("publish")
    finish = recorded.finished("finish")[0]
    assert publish.parent is not None
    assert publish.parent.span_id == completed.context.span_id
    assert finish.parent is not None
    assert finish.parent.span_id == completed.context.span_id
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "KeyError"


async def test_metrics_count_forwards_claims_acks_redeliveries_and_dead_letters(
    run_registry: RunRegistry, recorded: Recorded
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    assert recorded.total("registry.runs.held", **{"registry.worker_id": "test-worker"}) == 1
    await run_registry.forward_decisions_by_run_id("run-1", [decision("d1"), decision("d2")])
    assert await run_registry.forward_decisions_by_run_id("no-such-run", [decision("d3")]) is None
    assert await run_registry.forward_decisions_by_thread("agent-b", "thread-1", []) is None

    # d1 is acknowledged; d2 is delivered twice without an ack, then dead-lettered
    for _ in range(2):
        async with handle.decisions() as inbox:
            delivery = await inbox.get(timeout=DEADLINE)
            if delivery.decision.decision_id == "d1":
                assert await delivery.ack()
                delivery = await inbox.get(timeout=DEADLINE)
            assert delivery.decision.decision_id == "d2"
    async with handle.decisions() as inbox:
        with pytest.raises(TimeoutError):
            await inbox.get(timeout=0.2)

    forwards = "registry.forwards"
    assert recorded.total(forwards, **{"registry.forward.landed": True}) == 1
    assert recorded.total(forwards, **{"registry.forward.landed": False}) == 2
    assert recorded.total(forwards, **{"registry.forward.by": "thread_id"}) == 1
    assert recorded.total("registry.decisions.claimed") == 3  # d1, d2, d2 again
    assert recorded.total("registry.decisions.redelivered") == 1
    assert recorded.total("registry.decisions.dead_lettered") == 1
    assert recorded.total("registry.decisions.acknowledged") == 1
    [latency] = recorded.points("registry.decision.delivery.duration")
    assert latency.count == 2  # the first deliveries of d1 and d2
    assert 0 <= latency.sum < 60
    assert latency.attributes["db.system.name"] == "postgresql"

    assert await handle.remove()
    assert recorded.total("registry.runs.held") == 0


async def test_a_listener_reconnect_is_counted(
    run_registry: RunRegistry, registry_database_url: str, recorded: Recorded
) -> None:
    listener = run_registry.listener
    assert listener is not None
    connection = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        await connection.execute("SELECT pg_terminate_backend($1)", listener.backend_pid)
    finally:
        await connection.close()
    async with asyncio.timeout(DEADLINE * 2):
        while recorded.total("registry.listener.reconnects") < 1:
            await asyncio.sleep(0.05)


def test_without_opentelemetry_nothing_is_imported_or_wrapped(registry_database_url: str) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed

        from registry import RunRegistry, telemetry

        assert not telemetry.ENABLED
        assert not hasattr(RunRegistry.register, "__wrapped__")
        loaded = [name for name in sys.modules if name.startswith("opentelemetry.")]
        assert loaded == [], loaded

        async def main():
            async with RunRegistry.connect(sys.argv[1]) as runs:
                async with runs.run("run-1", "agent-a", "thread-1") as run:
                    landed = await runs.forward_decisions_by_run_id(
                        "run-1", [{"target_id": "t", "action": "resume", "updated_at": 1}]
                    )
                    assert landed is not None
                    async with run.decisions() as inbox:
                        assert await (await inbox.get(timeout=5)).ack()
            print("public calls work")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, registry_database_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "public calls work"
