"""registry.models: run statuses, outcomes, conflict policies and the reasons runs end with."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from registry import (
    ConflictPolicy,
    DecisionDelivery,
    InvalidInputError,
    RunOutcome,
    RunStatus,
    ToolCallDecision,
)
from registry.models import MAX_END_REASON_LENGTH, check_choice, end_reason, failure_summary


def test_only_queued_and_active_are_unfinished() -> None:
    unfinished = {status for status in RunStatus if not status.is_finished}
    assert unfinished == {RunStatus.ACTIVE, RunStatus.QUEUED}
    # every outcome a run can be finished with is a status
    assert {RunStatus(outcome.value) for outcome in RunOutcome} <= set(RunStatus)


@pytest.mark.parametrize("value", ["enqueue", ConflictPolicy.ENQUEUE])
def test_check_choice_takes_the_member_or_its_text(value: object) -> None:
    assert check_choice("on_conflict", value, ConflictPolicy) is ConflictPolicy.ENQUEUE


@pytest.mark.parametrize("value", ["interrupt", "", None, 1, RunOutcome.FAILED])
def test_check_choice_names_the_field_and_the_choices(value: object) -> None:
    with pytest.raises(InvalidInputError, match="on_conflict: must be one of 'supersede'"):
        check_choice("on_conflict", value, ConflictPolicy)


def test_end_reason_is_cut_and_checked() -> None:
    assert end_reason(None) is None
    assert end_reason("x" * 5000) == "x" * MAX_END_REASON_LENGTH
    with pytest.raises(InvalidInputError, match="reason"):
        end_reason("nul\x00")
    with pytest.raises(InvalidInputError, match="reason"):
        end_reason(42)


def test_failure_summary_is_the_type_and_first_line_storable() -> None:
    assert failure_summary(ValueError("first\nsecond")) == "ValueError: first"
    assert failure_summary(KeyError()) == "KeyError"
    assert failure_summary(RuntimeError("a\x00b \ud800")) == "RuntimeError: a\ufffdb ?"
    assert len(failure_summary(ValueError("y" * 5000))) == MAX_END_REASON_LENGTH


async def test_a_delivery_made_by_hand_cannot_be_acknowledged() -> None:
    delivery = DecisionDelivery(
        delivery_id=1,
        run_id="run-1",
        decision=ToolCallDecision.resume("call-1"),
        attempts=1,
        received_at=datetime(2026, 11, 30, tzinfo=UTC),
    )
    with pytest.raises(InvalidInputError, match="delivery"):
        await delivery.ack()
