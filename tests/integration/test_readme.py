"""The README's Python snippets run as written: the Quickstart twice against a real database,
and no snippet uses a name it neither defines, imports, nor declares as the application's
(a comment line ``# a, b: your application's``)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
#: the URL the Quickstart connects to, replaced by the test's database
QUICKSTART_URL = "postgresql://app@db.internal/agents"
#: a snippet's own declaration of the names its application provides
APPLICATIONS_OWN = re.compile(r"^# ([\w, ]+): your application's", re.MULTILINE)


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


async def run_python(path: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_quickstart_runs_twice(registry_database_url: str, tmp_path: Path) -> None:
    [quickstart] = [snippet for snippet in snippets() if QUICKSTART_URL in snippet]
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart.replace(QUICKSTART_URL, registry_database_url))
    for attempt in (1, 2):
        code, output = await run_python(script)
        assert code == 0, f"run {attempt}:\n{output}"
        assert "resume {'approved': True}" in output


@pytest.mark.parametrize("index", range(len(snippets())))
async def test_a_snippet_uses_no_undefined_name(index: int, tmp_path: Path) -> None:
    snippet = snippets()[index]
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ruff",
        "check",
        "--isolated",
        "--select",
        "F821",
        "--output-format",
        "json",
        str(script),
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    declared = {
        name.strip() for names in APPLICATIONS_OWN.findall(snippet) for name in names.split(",")
    }
    undefined = {
        re.sub(r"^Undefined name `(.*)`$", r"\1", finding["message"])
        for finding in json.loads(output)
    }
    assert undefined <= declared, f"snippet {index} of the README:\n{snippet}"
