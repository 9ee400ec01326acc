"""The notification protocol: one channel, a few kinds, a small typed JSON payload.

A notification means "look again", never "here is the data" (the tables are the truth); the
one exception is a small stream chunk, which may ride inline so that a subscriber that is
exactly caught up needs no query. The wire format, on channel :data:`CHANNEL`::

    {"kind": "decision" | "cancel" | "superseded" | "ended", "id": <run_id>}
    {"kind": "chunk", "id": <run_id>, "seq": <newest seq>, "data": <base64> | null}

Both ends import this module: :func:`encode` (and the statements in ``repository``, which
build the same objects with ``json_build_object``) write it, :func:`parse` reads it. A payload
that does not parse is ignored: the safety-net re-check covers whatever it meant.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from dataclasses import dataclass

#: The one notification channel; the version lets a future payload format run side by side.
CHANNEL = "registry_v1"

#: Largest chunk that may travel inline. NOTIFY payloads must stay under 8000 bytes (a
#: PostgreSQL limit); base64 grows by 4/3, and the run id and keys need the rest.
MAX_INLINE_BYTES = 4096


class NotificationKind(enum.StrEnum):
    """What a wake-up is about. The ``id`` in the payload names the run."""

    DECISION = "decision"
    CANCEL = "cancel"
    SUPERSEDED = "superseded"
    ENDED = "ended"
    CHUNK = "chunk"


@dataclass(frozen=True, slots=True)
class RunChanged:
    """Something happened to the run ``run_id``: decisions arrived, a cancel, its end."""

    kind: NotificationKind
    run_id: str


@dataclass(frozen=True, slots=True)
class ChunkPublished:
    """The run ``run_id`` has chunks up to ``seq``; ``data`` is chunk ``seq`` when it was
    published alone and small enough to travel inline, else ``None`` (read the table)."""

    run_id: str
    seq: int
    data: bytes | None = None


#: A parsed payload.
Notification = RunChanged | ChunkPublished


def inline_data(data: bytes) -> str:
    """The ``data`` field of a chunk notification: base64 of the chunk's bytes."""
    return base64.b64encode(data).decode("ascii")


def encode(notification: Notification) -> str:
    """The JSON payload of ``notification`` (compact; :func:`parse` reads it back)."""
    if isinstance(notification, ChunkPublished):
        fields: dict[str, object] = {
            "kind": NotificationKind.CHUNK.value,
            "id": notification.run_id,
            "seq": notification.seq,
            "data": None if notification.data is None else inline_data(notification.data),
        }
    else:
        if notification.kind is NotificationKind.CHUNK:
            raise ValueError("a chunk notification is a ChunkPublished")
        fields = {"kind": notification.kind.value, "id": notification.run_id}
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def parse(payload: str) -> Notification | None:
    """Read a payload; ``None`` if it is not one of the shapes above."""
    try:
        fields = json.loads(payload)
        kind = NotificationKind(fields["kind"])
        run_id = fields["id"]
        if not isinstance(run_id, str):
            return None
        if kind is not NotificationKind.CHUNK:
            return RunChanged(kind, run_id)
        seq = fields["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool):
            return None
        data = fields.get("data")
        return ChunkPublished(
            run_id, seq, None if data is None else base64.b64decode(data, validate=True)
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
