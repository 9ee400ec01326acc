"""The notification protocol: one channel, a few kinds, a small typed, signed JSON payload.

A notification means "look again", never "here is the data" (the tables are the truth); the
one exception is a small stream chunk, which may ride inline, sealed, so that a subscriber that
is exactly caught up needs no query. The wire format, on channel :data:`CHANNEL`, is 64 hex
digits of HMAC-SHA256 over the JSON text, then the JSON text::

    {"kind": "decision" | "cancel" | "superseded" | "ended" | "active", "id": <run_id>}
    {"kind": "chunk", "id": <run_id>, "seq": <newest seq>, "data": <sealed> | null}
    {"kind": "chunks", "runs": [[<run_id>, <newest seq>] | [<run_id>, <newest seq>, <sealed>], ...]}

The last is the wake-up of a batch: one commit that appended to many runs' streams sends one
payload (or a few, each under PostgreSQL's 8000-byte limit) rather than one per run, because
every committing transaction that notifies takes one database-wide lock.

Anyone who may connect to the database may NOTIFY on any channel and LISTEN to it (PostgreSQL
grants no privilege over either), so a payload is trusted only when its MAC verifies under
the database's notification secret (the ``notification_secrets`` table, readable by registry
roles only), and inline chunk data is sealed with AES-GCM under a key derived from the same
secret, bound to its run id: a listener without the secret learns run ids and sequence
numbers, never content. A payload that does not verify or parse is ignored; the safety-net
re-check covers whatever a lost notification meant.

Both ends import this module: :func:`encode` (and the statements in ``repository``, which
build the same objects with ``json_build_object`` and sign them in SQL with
:attr:`NotificationKey.inner_pad` and :attr:`NotificationKey.outer_pad`) write it,
:func:`parse` reads it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hmac
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The one notification channel; the version lets a future payload format run side by side
#: (v2: signed payloads, sealed inline data).
CHANNEL = "registry_v2"

#: Hex digits of the MAC that starts every payload.
MAC_LENGTH = 64
_NONCE_BYTES = 12

#: Largest chunk that may travel inline. NOTIFY payloads must stay under 8000 bytes (a
#: PostgreSQL limit); base64 grows by 4/3, and the nonce, tag, MAC, run id and keys need the rest.
MAX_INLINE_BYTES = 4096


class NotificationKind(enum.StrEnum):
    """What a wake-up is about. The ``id`` in the payload names the run."""

    DECISION = "decision"
    CANCEL = "cancel"
    SUPERSEDED = "superseded"
    ENDED = "ended"
    #: a queued run became the thread's active run
    ACTIVE = "active"
    CHUNK = "chunk"
    CHUNKS = "chunks"


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


@dataclass(frozen=True, slots=True)
class ChunksPublished:
    """Each run in ``runs`` (run id, newest seq) has chunks up to that seq. ``sealed``, when
    given, is aligned with ``runs``: the sealed data of a run's newest chunk when that chunk
    was appended alone and small, else ``None`` (read the table); :meth:`data` opens one, so
    a process unseals only the chunks of the runs it watches."""

    runs: tuple[tuple[str, int], ...]
    sealed: tuple[str | None, ...] = ()
    key: NotificationKey | None = field(default=None, compare=False, repr=False)

    def data(self, index: int) -> bytes | None:
        """The inline data of ``runs[index]``'s newest chunk, or ``None`` (read the table)."""
        if not self.sealed or self.key is None or self.sealed[index] is None:
            return None
        return self.key.unseal(self.runs[index][0], self.sealed[index] or "")


#: A parsed payload.
Notification = RunChanged | ChunkPublished | ChunksPublished

#: Bytes of a ``chunks`` payload's JSON text, at most: under NOTIFY's 8000-byte limit with
#: room for the MAC (64) and the envelope.
MAX_BATCH_PAYLOAD_BYTES = 7800
#: What one ``[run_id, seq]`` entry costs beyond its run id's JSON: brackets, PostgreSQL's
#: ", " separators, a seq of up to 19 digits, with room to spare.
_ENTRY_OVERHEAD = 32


def payload_groups(run_ids: Sequence[str], inline: Sequence[int] = ()) -> list[int]:
    """For a batch of runs to announce in ``chunks`` payloads: the payload number (0, 1, ...)
    of each run, in order, so that each payload stays under :data:`MAX_BATCH_PAYLOAD_BYTES`
    whatever its run ids hold (up to 255 characters each, escapes included). ``inline``,
    when given, is aligned with ``run_ids``: the length of each entry's sealed data (0 for
    none)."""
    groups: list[int] = []
    group = 0
    used = 0
    for index, run_id in enumerate(run_ids):
        cost = len(json.dumps(run_id, ensure_ascii=False).encode()) + _ENTRY_OVERHEAD
        if inline and inline[index]:
            cost += inline[index] + 4  # the quoted base64 and its separator
        if used and used + cost > MAX_BATCH_PAYLOAD_BYTES:
            group += 1
            used = 0
        used += cost
        groups.append(group)
    return groups


class NotificationKey:
    """The keys derived from a database's notification secret (32 random bytes).

    One key signs payloads (HMAC-SHA256), another seals inline chunk data (AES-256-GCM with
    the run id as associated data). Both are derived with HMAC-SHA256 under fixed labels, so
    the stored secret itself is never used directly.
    """

    __slots__ = ("_mac_key", "_sealer", "inner_pad", "outer_pad")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("a notification secret has at least 32 bytes")
        self._mac_key = hmac.digest(secret, b"registry/v2 notification mac", "sha256")
        self._sealer = AESGCM(hmac.digest(secret, b"registry/v2 inline chunk data", "sha256"))
        block = self._mac_key.ljust(64, b"\0")
        #: HMAC's inner and outer padded keys, for statements that sign in SQL:
        #: ``sha256(outer_pad || sha256(inner_pad || message))`` is HMAC-SHA256 (RFC 2104)
        self.inner_pad = bytes(byte ^ 0x36 for byte in block)
        self.outer_pad = bytes(byte ^ 0x5C for byte in block)

    def sign(self, text: str) -> str:
        """The payload for JSON ``text``: its MAC in hex, then the text."""
        return hmac.digest(self._mac_key, text.encode(), "sha256").hex() + text

    def verify(self, payload: str) -> str | None:
        """The JSON text of a payload whose MAC verifies, else ``None``."""
        mac, text = payload[:MAC_LENGTH], payload[MAC_LENGTH:]
        expected = hmac.digest(self._mac_key, text.encode(), "sha256").hex()
        # as bytes: a forged MAC may hold characters compare_digest refuses in a str
        return text if hmac.compare_digest(mac.encode(), expected.encode()) else None

    def seal(self, run_id: str, data: bytes) -> str:
        """Inline ``data`` of a chunk of ``run_id``: base64 of nonce, ciphertext and tag."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._sealer.encrypt(nonce, data, run_id.encode())
        return base64.b64encode(nonce + sealed).decode("ascii")

    def unseal(self, run_id: str, field: str) -> bytes | None:
        """The data :meth:`seal` sealed for ``run_id``, or ``None`` if it does not open."""
        try:
            raw = base64.b64decode(field, validate=True)
            return self._sealer.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], run_id.encode())
        except (InvalidTag, ValueError, binascii.Error):
            return None


class Keyring:
    """A registry's :class:`NotificationKey`, read from the database once, when first needed.

    ``load`` returns the secret (a statement of ``repository``); concurrent first callers
    share one load. Read-only callers (inspection, auditing) never need it.
    """

    __slots__ = ("_key", "_load", "_lock")

    def __init__(self, load: Callable[[], Awaitable[bytes]]) -> None:
        self._load = load
        self._key: NotificationKey | None = None
        self._lock = asyncio.Lock()

    @property
    def key(self) -> NotificationKey | None:
        """The key once loaded, else ``None``."""
        return self._key

    async def get(self) -> NotificationKey:
        """The key, loading the secret on the first call."""
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    self._key = NotificationKey(await self._load())
        return self._key


def encode(notification: Notification, key: NotificationKey) -> str:
    """The signed payload of ``notification`` (compact; :func:`parse` reads it back)."""
    fields: dict[str, object]
    if isinstance(notification, ChunksPublished):
        sealed = notification.sealed or (None,) * len(notification.runs)
        fields = {
            "kind": NotificationKind.CHUNKS.value,
            "runs": [
                [run_id, seq] if data is None else [run_id, seq, data]
                for (run_id, seq), data in zip(notification.runs, sealed, strict=True)
            ],
        }
    elif isinstance(notification, ChunkPublished):
        data = notification.data
        fields = {
            "kind": NotificationKind.CHUNK.value,
            "id": notification.run_id,
            "seq": notification.seq,
            "data": None if data is None else key.seal(notification.run_id, data),
        }
    else:
        if notification.kind in (NotificationKind.CHUNK, NotificationKind.CHUNKS):
            raise ValueError("a chunk notification is a ChunkPublished or ChunksPublished")
        fields = {"kind": notification.kind.value, "id": notification.run_id}
    return key.sign(json.dumps(fields, separators=(",", ":"), ensure_ascii=False))


def parse(payload: str, key: NotificationKey) -> Notification | None:
    """Read a payload; ``None`` if its MAC does not verify under ``key`` or it is not one of
    the shapes above. Inline data that does not unseal is dropped (``data`` is ``None``: the
    subscriber reads the table)."""
    text = key.verify(payload)
    if text is None:
        return None
    try:
        fields = json.loads(text)
        kind = NotificationKind(fields["kind"])
        if kind is NotificationKind.CHUNKS:
            return _chunks_published(fields["runs"], key)
        run_id = fields["id"]
        if not isinstance(run_id, str):
            return None
        if kind is not NotificationKind.CHUNK:
            return RunChanged(kind, run_id)
        seq = fields["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool):
            return None
        data = fields.get("data")
        if data is not None and not isinstance(data, str):
            return None
        return ChunkPublished(run_id, seq, None if data is None else key.unseal(run_id, data))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None


def _chunks_published(entries: object, key: NotificationKey) -> ChunksPublished | None:
    # exact types, not isinstance: every listener reads every batch of the database
    if type(entries) is not list:
        return None
    runs: list[tuple[str, int]] = []
    sealed: list[str | None] = []
    for entry in entries:
        if type(entry) is not list or not 2 <= len(entry) <= 3:
            return None
        run_id, seq = entry[0], entry[1]
        if type(run_id) is not str or type(seq) is not int:
            return None
        data = entry[2] if len(entry) == 3 else None
        if data is not None and type(data) is not str:
            return None
        runs.append((run_id, seq))
        sealed.append(data)
    if all(data is None for data in sealed):
        return ChunksPublished(tuple(runs))
    return ChunksPublished(tuple(runs), tuple(sealed), key)
