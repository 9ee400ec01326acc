"""The test plugin's Docker probe: false when no engine answers, and no socket left behind.

A socket leaked by the probe is finalized later, inside whichever test the garbage collector
happens to run in, and fails that test under ``filterwarnings = error``.
"""

from __future__ import annotations

import gc
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import testing


def _probe_without_leaks() -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = testing._docker_answers()
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == [], leaks
    return answers


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~100 bytes: pytest's tmp_path can be longer
    import tempfile

    with tempfile.TemporaryDirectory(prefix="regdk") as name:
        yield Path(name)


def test_stale_socket_file_is_not_an_engine(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a killed engine leaves: the socket file, nobody accepting on it
    path = socket_dir / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    assert path.exists()
    assert _probe_without_leaks() is False


def test_missing_socket_is_not_an_engine(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_dir / 'absent.sock'}")
    assert _probe_without_leaks() is False


def test_socket_that_hangs_up_is_not_an_engine(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # something accepts, then closes without an HTTP answer
    path = socket_dir / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    stop = threading.Event()

    def hang_up() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                peer, _ = server.accept()
            except TimeoutError:
                continue
            peer.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    try:
        assert _probe_without_leaks() is False
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
