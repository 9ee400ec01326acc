"""A pgbouncer in transaction pooling mode in front of the test server, for the fault tests.

:func:`running_pgbouncer` starts one (``pool_mode = transaction``, ``default_pool_size = 2``)
on a free port of 127.0.0.1, with its configuration, trust auth file, log and Unix socket in a
temporary directory, and stops it afterwards. Its ``[databases]`` section is a wildcard, so
every test database of the server is reachable through it under its own name.

The binary is the one on ``PATH`` (or ``/usr/sbin/pgbouncer``). When there is none, it is
installed from Debian's ``pgbouncer`` package if this process is root, ``apt-get`` exists, and
``CI`` is set (as on CI) or ``REGISTRY_TEST_INSTALL_PGBOUNCER=1``;
``REGISTRY_TEST_INSTALL_PGBOUNCER=0`` forbids it. Otherwise the tests that need it skip with
the reason. pgbouncer refuses to run as root: as root it runs as the owner of the server's Unix
socket directory (the embedded server's system user), else as ``nobody``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.helpers.proxy import target_of

#: server connections pgbouncer keeps per database and user
POOL_SIZE = 2
_INSTALL_TIMEOUT = 300.0
_START_TIMEOUT = 20.0
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}


@dataclass(frozen=True)
class Pgbouncer:
    """A running pgbouncer: ``port`` on 127.0.0.1, files in ``directory``."""

    port: int
    directory: Path
    version: str

    def url(self, database_url: str) -> str:
        """``database_url`` (a database of the test server) reached through this pgbouncer."""
        return (
            make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .difference_update_query(["host", "port"])
            .render_as_string(hide_password=False)
        )

    def log(self) -> str:
        """What pgbouncer logged so far."""
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def find_binary() -> str | None:
    """The pgbouncer binary, if one is installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def _install_allowed() -> str | None:
    """``None`` if installing is allowed here, else why not."""
    choice = os.environ.get("REGISTRY_TEST_INSTALL_PGBOUNCER", "").strip().lower()
    if choice in ("0", "false", "no"):
        return "REGISTRY_TEST_INSTALL_PGBOUNCER forbids installing it"
    if choice not in ("1", "true", "yes") and not os.environ.get("CI"):
        return "set REGISTRY_TEST_INSTALL_PGBOUNCER=1 (or CI) to let the tests install it"
    if os.geteuid() != 0:
        return "installing it needs root"
    if shutil.which("apt-get") is None:
        return "no apt-get to install it with"
    return None


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=60", *args],
        env={**os.environ, **_APT_ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def install_binary() -> str:
    """Install Debian's pgbouncer package; the binary's path, or ``pytest.skip`` with why not."""
    refused = _install_allowed()
    if refused is not None:
        pytest.skip(f"pgbouncer is not installed; {refused}")
    install = ("install", "-y", "--no-install-recommends", "pgbouncer")
    try:
        # the package lists may be missing or stale on a fresh machine: refresh them then
        policy = subprocess.run(
            ["apt-cache", "policy", "pgbouncer"], capture_output=True, text=True, check=False
        )
        if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
            _apt("update", timeout=_INSTALL_TIMEOUT)
        result = _apt(*install, timeout=_INSTALL_TIMEOUT)
        if result.returncode != 0:
            _apt("update", timeout=_INSTALL_TIMEOUT)
            result = _apt(*install, timeout=_INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing pgbouncer with apt-get took over {_INSTALL_TIMEOUT:.0f} s")
    binary = find_binary()
    if result.returncode != 0 or binary is None:
        pytest.skip(f"apt-get could not install pgbouncer: {_last_line(result)}")
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _run_as(server_host: str) -> pwd.struct_passwd | None:
    """The unprivileged user to run pgbouncer as (``None`` when not root)."""
    if os.geteuid() != 0:
        return None
    if server_host.startswith("/"):
        owner = os.stat(server_host).st_uid
        if owner != 0:
            return pwd.getpwuid(owner)
    return pwd.getpwnam("nobody")


def _config(directory: Path, server_url: str, port: int) -> Path:
    url = make_url(server_url)
    host, server_port = target_of(server_url)
    user = url.username or "postgres"
    password = (url.password or "").replace('"', '""')
    (directory / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    config = directory / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={host} port={server_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        f"unix_socket_dir = {directory}\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'userlist.txt'}\n"
        f"admin_users = {user}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {POOL_SIZE}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        "max_client_conn = 1000\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
    )
    return config


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if process.poll() is not None:
            log = (directory / "pgbouncer.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"pgbouncer exited with status {process.returncode}:\n{log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not listen on port {port} within {_START_TIMEOUT} s")
            time.sleep(0.05)  # polling a port under the deadline above


@contextmanager
def running_pgbouncer(server_url: str) -> Iterator[Pgbouncer]:
    """A pgbouncer in transaction mode in front of the server of ``server_url`` (a URL as a
    role that may connect to every test database); ``pytest.skip`` if none can be had."""
    binary = find_binary() or install_binary()
    version_run = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    version = (version_run.stdout.strip().splitlines() or ["pgbouncer ?"])[0]
    directory = Path(tempfile.mkdtemp(prefix="regpgb"))
    port = _free_port()
    config = _config(directory, server_url, port)
    user = _run_as(target_of(server_url)[0])
    if user is not None:
        for path in (directory, *directory.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
    with open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )
    try:
        _wait_until_listening(process, port, directory)
        yield Pgbouncer(port=port, directory=directory, version=version)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
