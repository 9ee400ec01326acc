"""An asyncio TCP proxy between a client and PostgreSQL, to cut or silence the wire on demand.

``async with TcpProxy(host, port) as proxy`` listens on ``127.0.0.1:proxy.port`` and relays each
accepted connection to ``host:port`` (a ``host`` starting with ``/`` is a Unix socket directory,
as in libpq: the server's socket ``<host>/.s.PGSQL.<port>``). :meth:`TcpProxy.freeze` stops
relaying in both directions while every socket stays open (a half-open peer: it just goes
silent); :meth:`TcpProxy.thaw` relays again, nothing lost; :meth:`TcpProxy.reset` cuts every
current connection with a TCP reset. :meth:`TcpProxy.url` points a database URL at the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self

from sqlalchemy.engine import make_url

_CHUNK = 65536


def target_of(database_url: str) -> tuple[str, int]:
    """The ``(host, port)`` a PostgreSQL URL reaches (host may be a Unix socket directory)."""
    url = make_url(database_url)
    query_host = url.query.get("host")
    host = url.host or (query_host if isinstance(query_host, str) else None) or "127.0.0.1"
    return host, url.port or 5432


class TcpProxy:
    """Relays TCP connections from ``127.0.0.1:port`` to a PostgreSQL server (see module doc)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        #: connections accepted since the proxy started
        self.accepted = 0
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        # per relayed connection: set to cut it at the server's next reply (or next COMMIT)
        self._doomed: set[asyncio.Event] = set()
        self._at_commit = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._closing = False

    @classmethod
    def in_front_of(cls, database_url: str) -> TcpProxy:
        """A proxy to the server ``database_url`` reaches."""
        return cls(*target_of(database_url))

    @property
    def port(self) -> int:
        """The port the proxy listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def open_connections(self) -> int:
        """Client connections currently relayed (or held, while frozen)."""
        return sum(1 for task in self._tasks if not task.done())

    def url(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the proxy's."""
        url = make_url(database_url)
        return (
            url.set(host="127.0.0.1", port=self.port)
            .difference_update_query(["host", "port"])
            .render_as_string(hide_password=False)
        )

    def freeze(self) -> None:
        """Stop relaying bytes both ways; sockets stay open and nothing read is dropped."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Relay again, starting with whatever was held while frozen."""
        self._flowing.set()

    def lose_next_replies(self) -> None:
        """Cut every current connection (TCP reset, both sides) when the server next answers
        on it, dropping that answer: the server did the work, the client never hears of it.
        Connections accepted afterwards are relayed as usual."""
        self._at_commit = False
        for doomed in self._doomed:
            doomed.set()

    def lose_next_commit_replies(self) -> None:
        """Like :meth:`lose_next_replies`, but at the server's next ``COMMIT`` completion on
        each current connection: the statements of a transaction pass, its commit happens, and
        the reply to it is lost with the connection."""
        self._at_commit = True
        for doomed in self._doomed:
            doomed.set()

    def reset(self) -> None:
        """Cut every current connection on both sides with a TCP reset (RST, not FIN)."""
        for writer in list(self._writers):
            _abort(writer)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        self.reset()
        # end the relays; their connection handlers then return (never cancel a handler:
        # asyncio's stream server reports a cancelled handler task as an error)
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(client_w)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_w: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Task[None]] = []
        try:
            if self.target_host.startswith("/"):
                path = f"{self.target_host}/.s.PGSQL.{self.target_port}"
                server_r, server_w = await asyncio.open_unix_connection(path)
            else:
                server_r, server_w = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            self._writers.add(server_w)
            if self._closing:
                return
            doomed = asyncio.Event()
            self._doomed.add(doomed)
            pumps = [
                asyncio.create_task(self._pump(client_r, server_w)),
                asyncio.create_task(self._pump(server_r, client_w, doomed, server_w)),
            ]
            self._pumps.update(pumps)
            # the first direction to end (EOF, error, reset) ends the other
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            self._doomed = {event for event in self._doomed if not event.is_set()}
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            for writer in (client_w, server_w):
                if writer is not None:
                    self._writers.discard(writer)
                    _abort(writer)
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        doomed: asyncio.Event | None = None,
        source: asyncio.StreamWriter | None = None,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                cut = doomed is not None and doomed.is_set()
                if cut and (not self._at_commit or _completes_commit(data)):
                    # the reply is lost with the connection, both sides reset
                    _abort(writer)
                    if source is not None:
                        _abort(source)
                    return
                await self._flowing.wait()  # frozen: hold the bytes, keep the socket
                writer.write(data)
                await writer.drain()
        if not writer.transport.is_closing():
            # frozen, an end is not passed on either: the other side sees only silence
            await self._flowing.wait()


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _completes_commit(data: bytes) -> bool:
    """Whether server bytes that start at a message boundary hold a CommandComplete of
    ``COMMIT`` (message type ``C``, a 4-byte length, then the tag). An idle connection's next
    answer starts at a boundary; a message cut across reads is not looked for."""
    offset = 0
    while offset + 5 <= len(data):
        kind = data[offset : offset + 1]
        length = int.from_bytes(data[offset + 1 : offset + 5], "big")
        if kind == b"C" and data[offset + 5 : offset + 12] == b"COMMIT\0":
            return True
        offset += 1 + length
    return False
