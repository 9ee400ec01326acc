"""Database URLs, read as libpq reads them: :func:`asyncpg_dsn`, :func:`connect_arguments`.

A user's URL (``postgresql://user:password@host:port,.../db?...``) is checked and turned into
what the driver needs: a DSN with only the parameters asyncpg reads from a DSN itself, and
keyword arguments for the rest. asyncpg would send any parameter it does not know to the
server as a run-time setting (``?ssl=require`` then fails as "parameter ssl cannot be changed
now", ``?connect_timeout=5`` as an unknown setting), and SQLAlchemy would pass each one to
``asyncpg.connect`` as a keyword (a TypeError): neither ever sees the user's URL. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from registry.errors import InvalidInputError
from registry.models import DEFAULT_SCHEMA as DEFAULT_SCHEMA
from registry.models import checked_schema as checked_schema

#: ``application_name`` of the query connections, unless the URL names the application itself.
APPLICATION_NAME = "registry"


_DRIVERS = {"postgres", "postgresql", "postgresql+asyncpg", "asyncpg"}


#: libpq parameters asyncpg reads from a DSN itself: passed on as they are, once checked.
_DRIVER_PARAMETERS = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcrl",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "passfile",
        "krbsrvname",
        "gsslib",
        "service",
    }
)
#: libpq parameters that become keyword arguments of asyncpg.connect.
_TRANSLATED = frozenset(
    {"connect_timeout", "application_name", "fallback_application_name", "options"}
)
#: libpq parameters that change nothing for asyncpg with these values (``None``: any value).
_NO_EFFECT: dict[str, frozenset[str] | None] = {
    "sslcompression": None,  # ignored by libpq itself since PostgreSQL 14
    "client_encoding": frozenset({"utf8", "utf-8", "unicode"}),  # asyncpg speaks UTF8 only
    "gssencmode": frozenset({"disable", "prefer"}),  # asyncpg never encrypts with GSSAPI
    "sslsni": frozenset({"1"}),  # asyncpg always sends SNI for a host name
}
#: libpq parameters asyncpg cannot honour: refused rather than silently dropped.
_UNSUPPORTED = frozenset(
    {
        "hostaddr",
        "require_auth",
        "channel_binding",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "requiressl",
        "sslcertmode",
        "sslcrldir",
        "sslkeylogfile",
        "requirepeer",
        "gssdelegation",
        "load_balance_hosts",
        "min_protocol_version",
        "max_protocol_version",
        "scram_client_key",
        "scram_server_key",
        "oauth_issuer",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_scope",
    }
)
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: the values libpq accepts for a parameter
_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "sslnegotiation": ("postgres", "direct"),
    "ssl_min_protocol_version": _TLS_VERSIONS,
    "ssl_max_protocol_version": _TLS_VERSIONS,
    "gsslib": ("gssapi", "sspi"),
}
#: ``scheme://[user[:password]@][hosts][/database][?query]``; a password may hold a ``/``
#: (as SQLAlchemy reads one), never a ``?``: an ``@`` in the query is not the user's
_URL_PARTS = re.compile(
    r"(?P<scheme>[\w+]+)://"
    r"(?:(?P<user>[^:/?@]*)(?::(?P<password>[^?@]*))?@)?"
    r"(?P<hosts>[^/?]*)"
    r"(?:/(?P<database>[^?]*))?"
    r"(?:\?(?P<query>.*))?",
    re.DOTALL,
)
#: a run-time parameter's name, as the server takes it from ``options``
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.$]*")
_DEFAULT_PORT = 5432


@dataclass(frozen=True, slots=True)
class _Target:
    """A database URL taken apart and checked, in libpq's terms."""

    user: str | None
    password: str | None
    database: str | None
    #: each host (a name, an address, or a Unix socket directory) and its port, if given
    hosts: tuple[tuple[str, int | None], ...]
    #: the port of a URL that names no host
    port: int | None
    #: parameters asyncpg reads from a DSN
    passed: tuple[tuple[str, str], ...]
    #: ``connect_timeout``, ``application_name``, ``fallback_application_name``, ``options``
    translated: tuple[tuple[str, str], ...]
    #: ``connect_timeout`` in seconds, when the URL sets a positive one
    timeout: float | None
    #: run-time parameters that ``options`` sets
    settings: tuple[tuple[str, str], ...]
    #: the registry's schema, when the URL names one (``?schema=``)
    schema: str | None = None

    def dsn(self, *, translated: bool) -> str:
        """This target as a DSN, with the translated parameters or without them (the DSN
        asyncpg gets). Hosts and ports go in the query: asyncpg ignores ``?port=`` next to a
        host in the authority, and reads only one of repeated parameters."""
        query: list[tuple[str, str]] = []
        if self.hosts:
            query.append(("host", ",".join(_bracketed(host) for host, _ in self.hosts)))
            if any(port is not None for _, port in self.hosts):
                fill = _env_port()
                ports = (str(fill if port is None else port) for _, port in self.hosts)
                query.append(("port", ",".join(ports)))
        elif self.port is not None:
            query.append(("port", str(self.port)))
        query.extend(self.passed)
        if translated:
            query.extend(self.translated)
            if self.schema is not None:
                query.append(("schema", self.schema))
        authority = ""
        if self.user or self.password:
            authority = urllib.parse.quote(self.user or "", safe="")
            if self.password:
                authority += ":" + urllib.parse.quote(self.password, safe="")
            authority += "@"
        # no database: asyncpg then takes $PGDATABASE, or the user's name
        path = "/" + urllib.parse.quote(self.database, safe="") if self.database else ""
        rendered = urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe=",/:")
        return f"postgresql://{authority}{path}" + (f"?{rendered}" if rendered else "")

    def server_settings(self, application_name: str) -> dict[str, str]:
        """Run-time parameters: those of ``options``, and the application name: the URL's
        ``application_name``, else one that ``options`` sets, else the URL's
        ``fallback_application_name``, else ``application_name``."""
        settings = dict(self.settings)
        given = dict(self.translated)
        if "application_name" in given:
            settings["application_name"] = given["application_name"]
        elif "application_name" not in settings:
            settings["application_name"] = given.get("fallback_application_name", application_name)
        return settings


def _env_port() -> int:
    # what libpq and asyncpg use for a host without a port
    text = os.environ.get("PGPORT", "").strip()
    if text.isascii() and text.isdecimal() and 1 <= int(text) <= 65535:
        return int(text)
    return _DEFAULT_PORT


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("/") else host


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _port_number(text: str, where: str) -> int:
    digits = text.strip()
    if not (digits.isascii() and digits.isdecimal() and len(digits) <= 5) or not (
        1 <= int(digits) <= 65535
    ):
        raise InvalidInputError("url", f"{where}: {_shown(text)} is not a port number (1-65535)")
    return int(digits)


def _host_entry(entry: str, where: str) -> tuple[str, int | None]:
    """A host of a host list: ``name``, ``name:port``, ``[address]``, ``[address]:port``, a
    bare IPv6 address, or a Unix socket directory (``/path``)."""
    if entry.startswith("/"):
        return entry, None
    if entry.startswith("["):
        address, bracket, rest = entry[1:].partition("]")
        if not bracket or not address or (rest and not rest.startswith(":")):
            raise InvalidInputError("url", f"{where}: {_shown(entry)} is not [address]:port")
        return address, _port_number(rest[1:], "port") if rest[1:] else None
    if entry.count(":") > 1:  # an IPv6 address without brackets, as libpq's host= takes it
        return entry, None
    name, _, port = entry.partition(":")
    if not name:
        raise InvalidInputError("url", f"{where}: a host in the list is empty")
    return name, _port_number(port, "port") if port else None


def _option_words(text: str) -> list[str]:
    # as the server splits options: at white space; a backslash takes the next character
    words: list[str] = []
    word: list[str] = []
    escaped = started = False
    for char in text:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = started = True
        elif char.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(char)
            started = True
    if escaped:
        raise InvalidInputError("url", "options: ends with a lone backslash")
    if started:
        words.append("".join(word))
    return words


def _options(text: str) -> list[tuple[str, str]]:
    """The run-time parameters that libpq's ``options`` sets: ``-c name=value`` (or
    ``-cname=value``) and ``--name=value``; any other switch is refused."""
    words = _option_words(text)
    settings: list[tuple[str, str]] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c":
            index += 1
            if index == len(words):
                raise InvalidInputError("url", "options: -c needs name=value after it")
            assignment = words[index]
        elif word.startswith("-c") or (word.startswith("--") and len(word) > 2):
            assignment = word[2:]
        else:
            raise InvalidInputError(
                "url",
                f"options: {_shown(word)} is not -c name=value or --name=value (the only "
                "switches the registry passes on)",
            )
        name, equals, value = assignment.partition("=")
        name = name.replace("-", "_")
        if not equals or not _SETTING_NAME.fullmatch(name):
            raise InvalidInputError("url", f"options: {_shown(assignment)} is not name=value")
        settings.append((name, value))
        index += 1
    return settings


def _connect_timeout(text: str) -> float | None:
    # libpq: a whole number of seconds; zero or less waits as long as the caller does
    digits = text.strip()
    unsigned = digits[1:] if digits[:1] in ("-", "+") else digits
    if not (unsigned.isascii() and unsigned.isdecimal() and len(unsigned) <= 9):
        raise InvalidInputError(
            "url", f"connect_timeout: {_shown(text)} is not a whole number of seconds"
        )
    seconds = int(digits)
    return float(seconds) if seconds > 0 else None


def _query_pairs(query: str) -> list[tuple[str, str]]:
    # as libpq reads a URI's query: percent-decoding only ('+' stays a plus sign)
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals:
            raise InvalidInputError(
                "url", f"parameter {_shown(urllib.parse.unquote(key))} has no value (name=value)"
            )
        pairs.append((urllib.parse.unquote(key), urllib.parse.unquote(value)))
    return pairs


def _url_parts(
    url: str | URL,
) -> tuple[str, str | None, str | None, list[str], str | None, list[tuple[str, str]]]:
    """The scheme, user, password, host entries of the authority, database and query pairs."""
    if isinstance(url, URL):
        entries = []
        if url.host:
            entries.append(_bracketed(url.host) + ("" if url.port is None else f":{url.port}"))
        pairs = [
            (key, value)
            for key, values in url.query.items()
            for value in ((values,) if isinstance(values, str) else values)
        ]
        return url.drivername, url.username, url.password, entries, url.database, pairs
    if not isinstance(url, str):
        raise InvalidInputError("url", f"must be a string, not {type(url).__name__}")
    match = _URL_PARTS.fullmatch(url.strip())
    if match is None:
        raise InvalidInputError("url", "not a database URL; use postgresql://...")
    unquote = urllib.parse.unquote
    user, password, database = (
        None if match[part] is None else unquote(match[part])
        for part in ("user", "password", "database")
    )
    hosts = match["hosts"]
    entries = [unquote(entry) for entry in hosts.split(",")] if hosts else []
    return match["scheme"], user, password, entries, database, _query_pairs(match["query"] or "")


def _target(url: str | URL) -> _Target:
    """Read ``url`` as libpq would; :class:`InvalidInputError` names what is wrong."""
    scheme, user, password, entries, database, pairs = _url_parts(url)
    # a NUL cannot travel in the startup packet: the driver would fail on it when connecting
    texts = [user, password, database, *entries, *(text for pair in pairs for text in pair)]
    if any(text is not None and "\x00" in text for text in texts):
        raise InvalidInputError("url", "contains a NUL character (%00)")
    if scheme not in _DRIVERS:
        raise InvalidInputError("url", f"unsupported scheme {scheme!r}; use postgresql://...")
    host_entries: list[str] | None = None
    port_entries: list[str] | None = None
    passed: dict[str, str] = {}
    translated: dict[str, str] = {}
    schema: str | None = None
    for key, value in pairs:
        name = "sslmode" if key == "ssl" else key  # SQLAlchemy's and asyncpg's spelling
        if name == "host":  # repeated, as SQLAlchemy writes several hosts
            host_entries = (host_entries or []) + value.split(",")
        elif name == "port":
            port_entries = (port_entries or []) + value.split(",")
        elif name == "dbname":
            database = value
        elif name == "user":
            user = value
        elif name == "password":
            password = value
        elif name == "schema":  # the registry's own parameter, never sent to the server
            schema = checked_schema(value)
        elif name in _DRIVER_PARAMETERS or name in _TRANSLATED:
            choices = _CHOICES.get(name)
            if choices is not None and value not in choices:
                raise InvalidInputError(
                    "url", f"{key}: {_shown(value)} is not one of {', '.join(choices)}"
                )
            if name == "sslmode" and passed.get(name, value) != value:
                raise InvalidInputError(
                    "url",
                    f"{key}={value!r} contradicts the sslmode given before ({passed[name]!r})",
                )
            (translated if name in _TRANSLATED else passed)[name] = value
        elif name in _NO_EFFECT:
            allowed = _NO_EFFECT[name]
            if allowed is not None and value.lower() not in allowed:
                raise InvalidInputError(
                    "url", f"{key}={_shown(value)} is not supported by the asyncpg driver"
                )
        elif name in _UNSUPPORTED:
            raise InvalidInputError(
                "url", f"the libpq parameter {key!r} is not supported by the asyncpg driver"
            )
        else:
            raise InvalidInputError(
                "url", f"unknown parameter {_shown(key)} (not a libpq connection parameter)"
            )
    # libpq: a parameter in the query overrides the URL's own host list
    if host_entries is not None:
        entries = host_entries
    hosts = [_host_entry(entry, "host") for entry in entries]
    if any(not host for host, _ in hosts):
        raise InvalidInputError("url", "host: a host in the list is empty")
    port: int | None = None
    if port_entries is not None:
        ports = [_port_number(entry, "port") for entry in port_entries]
        if len(ports) == 1:
            port = ports[0]
            hosts = [(host, port) for host, _ in hosts]
        elif len(ports) == len(hosts):
            hosts = [(host, number) for (host, _), number in zip(hosts, ports, strict=True)]
        else:
            raise InvalidInputError("url", f"port: {len(ports)} ports for {len(hosts)} hosts")
    timeout = None
    if "connect_timeout" in translated:
        timeout = _connect_timeout(translated["connect_timeout"])
    settings = _options(translated["options"]) if "options" in translated else []
    return _Target(
        user=user or None,
        password=password or None,
        database=database or None,
        hosts=tuple(hosts),
        port=port if not hosts else None,
        passed=tuple(passed.items()),
        translated=tuple(translated.items()),
        timeout=timeout,
        settings=tuple(settings),
        schema=schema,
    )


def async_url(url: str | URL) -> URL:
    """Return ``url`` as a SQLAlchemy URL for the asyncpg driver (to read its parts).

    Accepts ``postgres://``, ``postgresql://`` and ``postgresql+asyncpg://`` forms, including
    a Unix socket given as ``?host=/path`` and several hosts (``postgresql://a:1,b:2/db``,
    which becomes SQLAlchemy's ``?host=a:1&host=b:2``). Raises :class:`InvalidInputError` for
    anything else. Its parameters are checked by :func:`asyncpg_dsn`, not here.
    """
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError, TypeError) as exc:
            # SQLAlchemy does not read libpq's host list in the authority: read it as libpq
            target = _target(url)
            if len(target.hosts) < 2:
                raise InvalidInputError("url", f"not a database URL: {exc}") from exc
            query: dict[str, str | tuple[str, ...]] = dict(target.passed + target.translated)
            if target.schema is not None:
                query["schema"] = target.schema
            query["host"] = tuple(
                _bracketed(host) + ("" if port is None else f":{port}")
                for host, port in target.hosts
            )
            parsed = URL.create(
                "postgresql",
                username=target.user,
                password=target.password,
                database=target.database,
                query=query,
            )
    if parsed.drivername not in _DRIVERS:
        raise InvalidInputError(
            "url", f"unsupported scheme {parsed.drivername!r}; use postgresql://..."
        )
    return parsed.set(drivername="postgresql+asyncpg")


def schema_of(url: str | URL) -> str:
    """The schema that holds the registry's objects for ``url``: the URL's ``schema``
    parameter, else ``REGISTRY_SCHEMA``, else :data:`DEFAULT_SCHEMA`. Raises
    :class:`InvalidInputError` for a malformed URL or a schema name that is not a plain
    identifier."""
    schema = _target(url).schema
    if schema is not None:
        return schema
    return checked_schema(os.environ.get("REGISTRY_SCHEMA") or DEFAULT_SCHEMA)


def asyncpg_dsn(url: str | URL, *, schema: str | None = None) -> str:
    """Return ``url`` as the registry's DSN: checked, with every libpq parameter it sets.

    Raises :class:`InvalidInputError` naming what is wrong: a parameter that is not a libpq
    connection parameter (``?ssl=`` is taken as ``sslmode``), one the driver cannot honour,
    or a bad value (an unknown ``sslmode``, a ``connect_timeout`` or port that is not a
    number). :func:`connect` opens it (``asyncpg.connect`` alone reads a DSN without
    ``connect_timeout``, ``application_name`` or ``options``); :func:`connect_arguments`
    turns it into asyncpg's arguments. ``schema`` (:attr:`RegistrySettings.schema`) goes in
    as the ``schema`` parameter; a URL that names another raises :class:`InvalidInputError`.
    """
    target = _target(url)
    if schema is not None:
        schema = checked_schema(schema)
        if target.schema not in (None, schema):
            raise InvalidInputError(
                "schema", f"the setting says {schema!r}, the URL's parameter {target.schema!r}"
            )
        target = dataclasses.replace(target, schema=schema)
    return target.dsn(translated=True)


def connect_arguments(
    url: str | URL, *, application_name: str = APPLICATION_NAME, timeout: float = 60.0
) -> tuple[str, dict[str, Any]]:
    """What ``asyncpg.connect`` needs to reach ``url``: a DSN and keyword arguments.

    The DSN keeps what asyncpg reads from one (user, password, database, hosts and ports,
    ``sslmode`` and the other ``ssl*`` parameters, ``target_session_attrs``, ``passfile``,
    ``service``); ``connect_timeout`` becomes ``timeout`` (else ``timeout``; seconds for the
    whole connect, all hosts together); ``options`` (``-c name=value``, ``--name=value``) and
    the application name become ``server_settings``: the URL's ``application_name`` wins over
    ``application_name`` here.
    The query connections, the LISTEN connection and SQLAlchemy's engines all connect with
    these. Raises :class:`InvalidInputError` as :func:`asyncpg_dsn` does.
    """
    target = _target(url)
    arguments: dict[str, Any] = {
        "timeout": timeout if target.timeout is None else target.timeout,
        "server_settings": target.server_settings(application_name),
    }
    return target.dsn(translated=False), arguments


def endpoint(url: str | URL) -> tuple[str | None, str | None, int | None]:
    """The database name, the first host (a name, an address or a Unix socket directory) and
    its port that ``url`` names, as libpq reads them (``None``: not given; a host without a
    port has ``$PGPORT`` or 5432). What telemetry reports as ``db.namespace``,
    ``server.address`` and ``server.port``. Raises :class:`InvalidInputError` as
    :func:`asyncpg_dsn` does."""
    target = _target(url)
    if not target.hosts:
        return target.database, None, target.port
    host, port = target.hosts[0]
    return target.database, host, _env_port() if port is None else port
