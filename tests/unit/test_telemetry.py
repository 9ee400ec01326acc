"""The telemetry module's pure parts: attributes, span names, the decorator's paths, log fields."""

from __future__ import annotations

import pytest

from registry import telemetry


def test_a_target_carries_only_the_attributes_it_knows() -> None:
    target = telemetry.Target(namespace="app", address="db.local", port=5433, worker_id="w-1")
    assert dict(target.attributes) == {
        "db.system.name": "postgresql",
        "db.namespace": "app",
        "server.address": "db.local",
        "server.port": 5433,
        "registry.worker_id": "w-1",
    }
    assert target.span_name("register") == "register app"
    unknown = telemetry.Target()
    assert dict(unknown.attributes) == {"db.system.name": "postgresql"}
    assert unknown.span_name("register") == "register"


@pytest.mark.skipif(not telemetry.ENABLED, reason="opentelemetry-api is not installed")
def test_a_path_from_no_parameter_is_refused_at_decoration() -> None:
    with pytest.raises(ValueError, match="no parameter 'lease'"):

        @telemetry.traced("claim", run_id="lease.run_id")
        async def claim(self: object, run_id: str) -> None: ...


def test_log_fields_leave_out_what_is_not_known() -> None:
    assert telemetry.log_fields("run-1") == {"run_id": "run-1"}
    assert telemetry.log_fields("run-1", "thread-1", "w-1") == {
        "run_id": "run-1",
        "thread_id": "thread-1",
        "worker_id": "w-1",
    }
