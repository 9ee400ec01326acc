"""The notification wire format: signed encode and parse, sealed inline data, refusal of
forged and malformed payloads, size."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.models import MAX_ID_LENGTH
from registry.notifications import (
    MAC_LENGTH,
    MAX_BATCH_PAYLOAD_BYTES,
    MAX_INLINE_BYTES,
    ChunkPublished,
    ChunksPublished,
    NotificationKey,
    NotificationKind,
    RunChanged,
    encode,
    parse,
    payload_groups,
)

KEY = NotificationKey(bytes(range(32)))
OTHER_KEY = NotificationKey(bytes(range(1, 33)))


def body(payload: str) -> Any:
    """The JSON a payload carries after its MAC."""
    return json.loads(payload[MAC_LENGTH:])


#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
NOTIFY_PAYLOAD_LIMIT = 8000

CHUNK_KINDS = {NotificationKind.CHUNK, NotificationKind.CHUNKS}
RUN_CHANGED_KINDS = [kind for kind in NotificationKind if kind not in CHUNK_KINDS]
AWKWARD_RUN_ID = 'rün "quoted" \\ back\tslash 🚀 \u2028 end'

# run ids as storable by check_id: no NUL, no lone surrogates, 1..255 characters
run_ids = st.text(
    alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=MAX_ID_LENGTH,
)
# the autouse loop-error fixture of the suite is harmless to these pure, synchronous tests
pure = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@pytest.mark.parametrize("kind", RUN_CHANGED_KINDS)
@pytest.mark.parametrize("run_id", ["run-1", AWKWARD_RUN_ID])
def test_run_changed_round_trip(kind: NotificationKind, run_id: str) -> None:
    payload = encode(RunChanged(kind, run_id), KEY)
    assert body(payload) == {"kind": kind.value, "id": run_id}
    assert parse(payload, KEY) == RunChanged(kind, run_id)


def test_every_kind_but_chunk_is_a_run_changed() -> None:
    # guards the parametrization above: a new kind must be covered by the round trip
    assert set(RUN_CHANGED_KINDS) | CHUNK_KINDS == set(NotificationKind)
    assert len(RUN_CHANGED_KINDS) == 5


@pytest.mark.parametrize(
    "data",
    [None, b"", b"hello", bytes(range(256)), b"\x00\xff\x00", "é🚀".encode()],
    ids=["none", "empty", "ascii", "all-bytes", "nul-bytes", "utf8"],
)
@pytest.mark.parametrize("run_id", ["run-1", AWKWARD_RUN_ID])
def test_chunk_round_trip(data: bytes | None, run_id: str) -> None:
    notification = ChunkPublished(run_id, 42, data)
    payload = encode(notification, KEY)
    fields = body(payload)
    assert fields["kind"] == "chunk"
    assert fields["id"] == run_id
    assert fields["seq"] == 42
    assert (fields["data"] is None) == (data is None)
    parsed = parse(payload, KEY)
    assert parsed == notification
    assert isinstance(parsed, ChunkPublished)
    assert parsed.data == data  # b"" stays b"", not None


def test_chunk_data_defaults_to_none() -> None:
    assert parse(encode(ChunkPublished("r", 1), KEY), KEY) == ChunkPublished("r", 1, None)
    assert parse(KEY.sign('{"kind":"chunk","id":"r","seq":1}'), KEY) == ChunkPublished("r", 1)


def test_parse_reads_the_json_build_object_formatting() -> None:
    # the statements in ``repository`` build payloads with PostgreSQL's json_build_object,
    # which puts spaces around the separators, and sign them in SQL
    cancel = KEY.sign('{"kind" : "cancel", "id" : "r"}')
    assert parse(cancel, KEY) == RunChanged(NotificationKind.CANCEL, "r")
    sealed = KEY.seal("r", b"\x00\x01")
    chunk = KEY.sign(f'{{"kind" : "chunk", "id" : "r", "seq" : 7, "data" : "{sealed}"}}')
    assert parse(chunk, KEY) == ChunkPublished("r", 7, b"\x00\x01")
    bare = KEY.sign('{"kind" : "chunk", "id" : "r", "seq" : 7, "data" : null}')
    assert parse(bare, KEY) == ChunkPublished("r", 7, None)


@pytest.mark.parametrize("kind", RUN_CHANGED_KINDS)
def test_an_unsigned_payload_is_ignored(kind: NotificationKind) -> None:
    # any role that may connect may NOTIFY on our channel: what it sends without the key is
    # not a notification
    assert parse(json.dumps({"kind": kind.value, "id": "r"}), KEY) is None
    assert parse("0" * MAC_LENGTH + json.dumps({"kind": kind.value, "id": "r"}), KEY) is None


def test_a_payload_signed_with_another_key_is_ignored() -> None:
    assert parse(encode(RunChanged(NotificationKind.CANCEL, "r"), OTHER_KEY), KEY) is None


def test_a_tampered_payload_is_ignored() -> None:
    payload = encode(RunChanged(NotificationKind.ENDED, "run-1"), KEY)
    assert parse(payload.replace("run-1", "run-2"), KEY) is None
    assert parse(payload.replace('"ended"', '"cancel"'), KEY) is None


def test_inline_data_is_sealed_and_bound_to_its_run() -> None:
    secret = b"the browser must not see this"
    payload = encode(ChunkPublished("run-1", 3, secret), KEY)
    assert secret not in payload.encode()
    fields = body(payload)
    assert secret not in base64.b64decode(fields["data"])
    # sealed for run-1: moved to another run's signed notification, it does not open
    moved = KEY.sign(json.dumps({"kind": "chunk", "id": "run-2", "seq": 3, "data": fields["data"]}))
    assert parse(moved, KEY) == ChunkPublished("run-2", 3, None)
    # forged data under a valid signature (an insider with the key could not do better than
    # this, an outsider cannot sign at all) does not unseal either
    forged = KEY.sign(json.dumps({"kind": "chunk", "id": "run-1", "seq": 3, "data": "AAE="}))
    assert parse(forged, KEY) == ChunkPublished("run-1", 3, None)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NotificationKey(b"short")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("", id="empty"),
        pytest.param("not json", id="not-json"),
        pytest.param('{"kind":"cancel","id":"r"', id="truncated"),
        pytest.param("[1, 2]", id="array"),
        pytest.param('["cancel", "r"]', id="array-of-strings"),
        pytest.param('"cancel"', id="string"),
        pytest.param("42", id="number"),
        pytest.param("null", id="null"),
        pytest.param('{"kind":"nope","id":"r"}', id="unknown-kind"),
        pytest.param('{"kind":"CANCEL","id":"r"}', id="kind-wrong-case"),
        pytest.param('{"kind":null,"id":"r"}', id="null-kind"),
        pytest.param('{"kind":["cancel"],"id":"r"}', id="list-kind"),
        pytest.param('{"id":"r"}', id="missing-kind"),
        pytest.param('{"kind":"cancel"}', id="missing-id"),
        pytest.param('{"kind":"cancel","id":7}', id="int-id"),
        pytest.param('{"kind":"cancel","id":null}', id="null-id"),
        pytest.param('{"kind":"decision","id":["r"]}', id="list-id"),
        pytest.param('{"kind":"chunk","id":5,"seq":1}', id="chunk-int-id"),
        pytest.param('{"kind":"chunk","id":"r"}', id="chunk-without-seq"),
        pytest.param('{"kind":"chunk","id":"r","data":null}', id="chunk-without-seq-data"),
        pytest.param('{"kind":"chunk","id":"r","seq":"3"}', id="string-seq"),
        pytest.param('{"kind":"chunk","id":"r","seq":3.0}', id="float-seq"),
        pytest.param('{"kind":"chunk","id":"r","seq":null}', id="null-seq"),
        pytest.param('{"kind":"chunk","id":"r","seq":true}', id="bool-seq-true"),
        pytest.param('{"kind":"chunk","id":"r","seq":false}', id="bool-seq-false"),
        pytest.param('{"kind":"chunk","id":"r","seq":1,"data":"not base64!"}', id="bad-b64"),
        pytest.param('{"kind":"chunk","id":"r","seq":1,"data":"AAA"}', id="bad-padding"),
        pytest.param('{"kind":"chunk","id":"r","seq":1,"data":"AA\\nAA=="}', id="b64-newline"),
        pytest.param('{"kind":"chunk","id":"r","seq":1,"data":"é"}', id="non-ascii-data"),
        pytest.param('{"kind":"chunk","id":"r","seq":1,"data":5}', id="int-data"),
        pytest.param('{"kind":"chunk","id":"r","seq":1,"data":["AA=="]}', id="list-data"),
    ],
)
def test_parse_refuses_malformed_payloads(payload: str) -> None:
    assert parse(payload, KEY) is None


def test_encode_refuses_a_chunk_run_changed() -> None:
    with pytest.raises(ValueError, match="ChunkPublished"):
        encode(RunChanged(NotificationKind.CHUNK, "r"), KEY)


@pytest.mark.parametrize(
    "run_id",
    [
        pytest.param("r" * MAX_ID_LENGTH, id="ascii"),
        pytest.param("🚀" * MAX_ID_LENGTH, id="four-byte-utf8"),
        pytest.param("\x01" * MAX_ID_LENGTH, id="escaped-control"),
        pytest.param('"' * MAX_ID_LENGTH, id="quotes"),
        pytest.param("\\" * MAX_ID_LENGTH, id="backslashes"),
    ],
)
def test_largest_inline_chunk_fits_a_notify_payload(run_id: str) -> None:
    notification = ChunkPublished(run_id, 2**63 - 1, bytes(range(256)) * (MAX_INLINE_BYTES // 256))
    assert notification.data is not None
    assert len(notification.data) == MAX_INLINE_BYTES
    payload = encode(notification, KEY)
    assert len(payload.encode("utf-8")) < NOTIFY_PAYLOAD_LIMIT
    assert parse(payload, KEY) == notification


@pure
@given(
    run_id=run_ids,
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    data=st.none() | st.binary(max_size=MAX_INLINE_BYTES),
)
def test_chunk_round_trip_property(run_id: str, seq: int, data: bytes | None) -> None:
    notification = ChunkPublished(run_id, seq, data)
    payload = encode(notification, KEY)
    assert len(payload.encode("utf-8")) < NOTIFY_PAYLOAD_LIMIT
    assert parse(payload, KEY) == notification


@pure
@given(run_id=run_ids, kind=st.sampled_from(RUN_CHANGED_KINDS))
def test_run_changed_round_trip_property(run_id: str, kind: NotificationKind) -> None:
    notification = RunChanged(kind, run_id)
    assert parse(encode(notification, KEY), KEY) == notification


def test_a_batch_wake_up_round_trips_in_order() -> None:
    notification = ChunksPublished((("run-b", 7), (AWKWARD_RUN_ID, 2**63 - 1), ("run-a", 1)))
    payload = encode(notification, KEY)
    assert body(payload)["kind"] == "chunks"
    assert parse(payload, KEY) == notification


@pytest.mark.parametrize(
    "runs",
    [
        "not a list",
        [["run-1"]],
        [["run-1", 1, 2]],
        [[1, 1]],
        [["run-1", "1"]],
        [["run-1", True]],
        [{"id": "run-1", "seq": 1}],
    ],
)
def test_a_malformed_batch_wake_up_is_ignored(runs: object) -> None:
    payload = KEY.sign(json.dumps({"kind": "chunks", "runs": runs}))
    assert parse(payload, KEY) is None


def test_a_batch_wake_up_signed_with_another_key_is_ignored() -> None:
    payload = encode(ChunksPublished((("run-1", 1),)), OTHER_KEY)
    assert parse(payload, KEY) is None


@pure
@given(run_ids=st.lists(run_ids, min_size=1, max_size=120))
def test_payload_groups_keep_every_batch_payload_under_the_limit(run_ids: list[str]) -> None:
    groups = payload_groups(run_ids)
    assert len(groups) == len(run_ids)
    # numbered 0, 1, ... in order, each group a contiguous slice
    assert groups[0] == 0
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(groups))
    for group in set(groups):
        members = [run_id for run_id, g in zip(run_ids, groups, strict=True) if g == group]
        notification = ChunksPublished(tuple((run_id, 2**63 - 1) for run_id in members))
        payload = encode(notification, KEY)
        # PostgreSQL's json_agg writes ", " where Python's compact form writes ","
        spaced = len(payload.encode()) + 2 * 2 * len(members) + 16
        assert spaced < NOTIFY_PAYLOAD_LIMIT
        assert parse(payload, KEY) == notification


def test_payload_groups_split_only_when_needed() -> None:
    small = [f"run-{index}" for index in range(100)]
    assert set(payload_groups(small)) == {0}
    large = ["x" * 255] * 100
    groups = payload_groups(large)
    assert max(groups) >= 3
    assert MAX_BATCH_PAYLOAD_BYTES // (255 + 2) >= groups.count(0) > 1


def test_a_batch_wake_up_carries_sealed_chunks_opened_one_run_at_a_time() -> None:
    sealed = KEY.seal("run-a", b"inline bytes")
    notification = ChunksPublished((("run-a", 3), ("run-b", 9)), (sealed, None))
    parsed = parse(encode(notification, KEY), KEY)
    assert isinstance(parsed, ChunksPublished)
    assert parsed == notification
    assert parsed.data(0) == b"inline bytes"
    assert parsed.data(1) is None, "no inline data: read the table"
    # sealed for another run (a forger who replays it elsewhere) does not open
    moved = ChunksPublished((("run-b", 3),), (sealed,))
    moved_parsed = parse(encode(moved, KEY), KEY)
    assert isinstance(moved_parsed, ChunksPublished)
    assert moved_parsed.data(0) is None


@pytest.mark.parametrize("entry", [["run-1", 1, 7], ["run-1", 1, None, "x"], ["run-1", 1, ["x"]]])
def test_a_batch_entry_with_bad_inline_data_is_ignored(entry: list[object]) -> None:
    payload = KEY.sign(json.dumps({"kind": "chunks", "runs": [entry]}))
    assert parse(payload, KEY) is None


@pure
@given(run_ids=st.lists(run_ids, min_size=1, max_size=60), size=st.integers(0, 512))
def test_payload_groups_leave_room_for_inline_chunks(run_ids: list[str], size: int) -> None:
    sealed = [KEY.seal(run_id, bytes(size)) for run_id in run_ids]
    groups = payload_groups(run_ids, [len(text) for text in sealed])
    for group in set(groups):
        members = [index for index, g in enumerate(groups) if g == group]
        notification = ChunksPublished(
            tuple((run_ids[index], 2**63 - 1) for index in members),
            tuple(sealed[index] for index in members),
        )
        payload = encode(notification, KEY)
        spaced = len(payload.encode()) + 3 * 2 * len(members) + 16
        assert spaced < NOTIFY_PAYLOAD_LIMIT
