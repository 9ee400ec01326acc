"""The example agent server in a real browser: two server processes (uvicorn) on one
database, the page in headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium).

It checks that a page reloaded mid-stream shows every chunk once, in order; that the page's
approval, sent to one server, reaches the run the other server holds; and that the page's
cancel ends the stream. Chromium is installed with apt-get when absent and the test may
(root, or ``CI=true``); otherwise the test is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.helpers.network import free_port  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_server"
#: the toy agent's chunks, as examples/agent_server/app.py streams them
BEFORE = ["Looking ", "at ", "/srv/scratch: ", "3 stale ", "build ", "folders, ", "1.2 GB. "]
TOOL_CALL = '[tool call delete_files(path="/srv/scratch/build-*") awaits approval] '
APPROVED = ["Approved: ", "deleting. ", "Done, ", "1.2 GB ", "freed."]
AGENT_ID = "example-agent"
#: a server process starts (imports, connects) within this many seconds
START_DEADLINE = 20.0
#: what the page shows happens within this many seconds
PAGE_DEADLINE = 10.0

pytestmark = pytest.mark.timeout(60)


def _browser_binaries() -> tuple[str, str] | str:
    """The paths of chromium and chromedriver, installing them if allowed; else why not."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if None not in found:
        return found[0] or "", found[1] or ""
    may_install = os.geteuid() == 0 or os.environ.get("CI", "").lower() == "true"
    if not may_install or shutil.which("apt-get") is None:
        return "no chromium/chromium-driver, and no apt-get as root or CI=true to install them"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    result = subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
        capture_output=True,
        timeout=600,
        check=False,
    )
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if result.returncode != 0 or None in found:
        return f"apt-get could not install chromium: {result.stderr.decode()[-200:]}"
    return found[0] or "", found[1] or ""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    binaries = _browser_binaries()
    if isinstance(binaries, str):
        pytest.skip(binaries)
    chromium, chromedriver = binaries
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def example_servers(database_url: str, names: list[str]) -> Iterator[dict[str, str]]:
    """Start one example server process per name on ``database_url``; yield their base URLs."""
    processes: list[subprocess.Popen[bytes]] = []
    bases: dict[str, str] = {}
    try:
        for name in names:
            port = free_port()
            env = {
                **os.environ,
                "REGISTRY_DATABASE_URL": database_url,
                "REGISTRY_WORKER_ID": name,
                "AGENT_CHUNK_DELAY": "0.15",
            }
            command = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE), "app:app"]
            processes.append(
                subprocess.Popen(
                    [*command, "--port", str(port), "--log-level", "warning"],
                    env=env,
                    stderr=subprocess.PIPE,
                )
            )
            bases[name] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_DEADLINE
        for process, base in zip(processes, bases.values(), strict=True):
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    if httpx.get(f"{base}/registry/runs/none", timeout=1).status_code == 404:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"{base} did not answer in time"
                time.sleep(0.05)
        yield bases
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()


def start_run(base: str, thread_id: str) -> str:
    response = httpx.post(f"{base}/threads/{thread_id}/runs", timeout=5)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def shown(driver: WebDriver) -> list[tuple[str, str]]:
    """The chunks the page shows: (seq, text) in page order."""
    items = driver.find_elements(By.CSS_SELECTOR, "#chunks li")
    return [
        (item.get_attribute("data-seq") or "", item.get_attribute("textContent") or "")
        for item in items
    ]


def status(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "status").text


def wait_for(driver: WebDriver, condition: str, check: object) -> None:
    WebDriverWait(driver, PAGE_DEADLINE, poll_frequency=0.05).until(
        lambda page: check(page),  # type: ignore[operator]
        message=f"the page did not show {condition}: {status(driver)!r}, {shown(driver)}",
    )


def test_the_page_resumes_approves_across_servers_and_cancels(
    browser: WebDriver, registry_database_url: str
) -> None:
    with example_servers(registry_database_url, ["server-a", "server-b"]) as bases:
        page_server, run_server = bases["server-a"], bases["server-b"]
        run_id = start_run(run_server, "thread-approve")
        browser.get(f"{page_server}/?thread=thread-approve&run={run_id}")
        wait_for(browser, "three chunks", lambda page: len(shown(page)) >= 3)
        assert len(shown(browser)) < len(BEFORE) + 1  # the stream goes on: reload now
        browser.refresh()  # the page follows the run again from its start
        wait_for(browser, "the tool call", lambda page: len(shown(page)) == len(BEFORE) + 1)
        browser.find_element(By.ID, "approve").click()
        wait_for(browser, "the run's end", lambda page: status(page).startswith("ended"))
        expected = [*BEFORE, TOOL_CALL, *APPROVED]
        assert shown(browser) == [(str(seq), text) for seq, text in enumerate(expected, 1)]
        assert status(browser) == "ended: completed"
        record = httpx.get(f"{page_server}/registry/runs/{run_id}", timeout=5).json()
        assert (record["owner_id"], record["status"]) == ("server-b", "completed")

        run_id = start_run(run_server, "thread-cancel")
        browser.get(f"{page_server}/?thread=thread-cancel&run={run_id}")
        wait_for(browser, "a chunk", lambda page: len(shown(page)) >= 1)
        browser.find_element(By.ID, "cancel").click()
        wait_for(browser, "the run's end", lambda page: status(page).startswith("ended"))
        assert status(browser) == "ended: cancelled"
        seqs = [int(seq) for seq, _ in shown(browser)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < len(BEFORE) + 1
