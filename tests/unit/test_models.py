"""ToolCallDecision: the seed's JSON shape, constructors and validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from registry import InvalidInputError, ResumeDecisionAction, ToolCallDecision
from registry.models import check_id


def test_resume_constructor_matches_seed_shape() -> None:
    decision = ToolCallDecision.resume("call-1", {"approved": True}, 1_700_000_000_000)
    assert decision.to_dict() == {
        "target_id": "call-1",
        "decision_id": "",
        "action": "resume",
        "result": {"approved": True},
        "updated_at": 1_700_000_000_000,
    }


def test_cancel_constructor_keeps_reason_and_omits_null_result() -> None:
    decision = ToolCallDecision.cancel("call-2", reason="denied", updated_at=7, decision_id="d-1")
    assert decision.action is ResumeDecisionAction.CANCEL
    assert decision.to_dict() == {
        "target_id": "call-2",
        "decision_id": "d-1",
        "action": "cancel",
        "reason": "denied",
        "updated_at": 7,
    }


def test_json_round_trip() -> None:
    text = (
        '{"target_id":"t","decision_id":"d","action":"resume",'
        '"result":[1,"two",{"3":null}],"reason":"ok","updated_at":5}'
    )
    decision = ToolCallDecision.model_validate_json(text)
    assert json.loads(decision.to_json()) == json.loads(text)
    assert ToolCallDecision.model_validate_json(decision.to_json()) == decision


def test_missing_result_and_reason_default_like_the_seed() -> None:
    decision = ToolCallDecision.model_validate(
        {"target_id": "t", "decision_id": "", "action": "cancel", "updated_at": 0}
    )
    assert decision.result is None
    assert decision.reason is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"decision_id": "", "action": "resume", "updated_at": 1}, "target_id"),
        ({"target_id": "", "action": "resume", "updated_at": 1}, "target_id"),
        ({"target_id": "t", "action": "approve", "updated_at": 1}, "action"),
        ({"target_id": "t", "action": "resume", "updated_at": -1}, "updated_at"),
        ({"target_id": "t", "action": "resume", "updated_at": 2**63}, "updated_at"),
        ({"target_id": "t", "action": "resume", "updated_at": "5"}, "updated_at"),
        ({"target_id": "t", "action": "resume", "updated_at": True}, "updated_at"),
        ({"target_id": "t", "action": "resume"}, "updated_at"),
        ({"target_id": "t\x00", "action": "resume", "updated_at": 1}, "target_id"),
        ({"target_id": "t" * 256, "action": "resume", "updated_at": 1}, "target_id"),
        (
            {"target_id": "t", "decision_id": "d" * 256, "action": "resume", "updated_at": 1},
            "decision_id",
        ),
        ({"target_id": "t", "action": "resume", "updated_at": 1, "reason": "a\x00b"}, "reason"),
        ({"target_id": "t", "action": "resume", "updated_at": 1, "extra": 1}, "extra"),
        (
            {"target_id": "t", "action": "resume", "updated_at": 1, "result": {"k": "\x00"}},
            "result",
        ),
        ({"target_id": "t", "action": "resume", "updated_at": 1, "result": float("nan")}, "result"),
        ({"target_id": 5, "action": "resume", "updated_at": 1}, "target_id"),
    ],
)
def test_bad_decisions_raise_typed_error_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        ToolCallDecision.model_validate(data)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_result_that_is_not_json_is_refused_by_constructor() -> None:
    with pytest.raises(InvalidInputError) as caught:
        ToolCallDecision.resume("t", {1, 2}, 0)  # type: ignore[arg-type]
    assert caught.value.field == "result"


def test_malformed_json_text_is_a_typed_error() -> None:
    with pytest.raises(InvalidInputError):
        ToolCallDecision.model_validate_json("{not json")


def test_decisions_are_immutable() -> None:
    decision = ToolCallDecision.resume("t", None, 0)
    with pytest.raises(Exception, match="frozen"):
        decision.target_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty"),
        ("x" * 256, "255"),
        ("a\x00b", "NUL"),
        ("\ud800", "surrogate"),
        (None, "expected a string"),
        (12, "expected a string"),
    ],
)
def test_check_id_rejects(value: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        check_id("run_id", value)
    assert caught.value.field == "run_id"


def test_check_id_accepts_quotes_sql_and_unicode() -> None:
    for value in ["'; DROP TABLE runs; --", 'a"b', "线程-1", "x" * 255, "$1", "\\"]:
        assert check_id("thread_id", value) == value


def test_coerce_names_the_position_in_the_batch() -> None:
    with pytest.raises(InvalidInputError) as caught:
        ToolCallDecision.coerce("decisions[3]", {"target_id": "t", "action": "x", "updated_at": 0})
    assert caught.value.field == "decisions[3].action"
    with pytest.raises(InvalidInputError) as caught:
        ToolCallDecision.coerce("decisions[0]", "resume")
    assert caught.value.field == "decisions[0]"
