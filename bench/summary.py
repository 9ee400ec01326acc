"""Run every benchmark in sequence, sized to finish in about 10 minutes on 2 cores, and print
their headline figures as one markdown table.

Run it from the checkout, with the project and the ``bench`` extra installed (``make bench``
does both)::

    python bench/summary.py [--only core,history] [--markdown PATH]

Each script runs as it would on its own (its full output goes by), with the flags in
``SCRIPTS`` that keep the whole under 10 minutes, and appends its headline figures (the rows
that carry a goal) to one JSON-lines file through its ``--summary`` option; the table at the
end is read from that file. A script that fails is named under the table, and the others
still run. The server is each script's own: ``$REGISTRY_DATABASE_URL`` if set, else an
embedded PostgreSQL per script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from _shared import Headline, read_summary

HERE = Path(__file__).resolve().parent

#: each script and the flags that fit the whole in about 10 minutes on 2 cores
SCRIPTS: dict[str, list[str]] = {
    "core": ["--iterations", "200"],
    "streams": [],
    "fleet": ["--quick"],
    "decisions": ["--quick"],
    "history": [],
    "watching": ["--window", "15"],
}

VERSION = re.compile(r"PostgreSQL (\d+(?:\.\d+)?)")


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_script(name: str, summary: str) -> tuple[int, float, str | None]:
    """Run ``bench/<name>.py``, echoing its output; its exit status, seconds, and the
    PostgreSQL version its output named."""
    command = [sys.executable, str(HERE / f"{name}.py"), *SCRIPTS[name], "--summary", summary]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    version = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = VERSION.search(line)
            if version is None and line.startswith("server:") and found:
                version = found.group(1)
    return process.returncode, time.monotonic() - started, version


def markdown(headlines: Sequence[Headline]) -> str:
    """The headline figures as a markdown table."""
    lines = [
        "| benchmark | figure | ours | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for one in headlines:
        met = "-" if one.met is None else ("yes" if one.met else "**no**")
        cells = [one.bench, one.name, one.ours, one.baseline, one.ratio, one.goal or "-", met]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run every benchmark and print one summary table (see the docstring)."
    )
    parser.add_argument(
        "--only",
        help="comma-separated scripts to run, of " + ", ".join(SCRIPTS) + " (default: all)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to PATH")
    arguments = parser.parse_args(argv)
    names = list(SCRIPTS)
    if arguments.only:
        names = [name.strip() for name in arguments.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in SCRIPTS]
        if unknown:
            parser.error(f"unknown scripts {unknown}; choose from {', '.join(SCRIPTS)}")
    started = time.monotonic()
    failures: list[str] = []
    timings: list[str] = []
    versions: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="regbench-summary") as directory:
        summary = os.path.join(directory, "summary.jsonl")
        Path(summary).touch()
        for name in names:
            status, seconds, version = run_script(name, summary)
            timings.append(f"{name} {seconds:.0f} s")
            if version:
                versions.add(version)
            if status != 0:
                failures.append(f"{name} (exit status {status})")
        headlines = read_summary(summary)
    elapsed = time.monotonic() - started
    table = markdown(headlines)
    machine = (
        f"{datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, {os.cpu_count()} cores, "
        f"PostgreSQL {', '.join(sorted(versions)) or 'n/a'}, Python {platform.python_version()}"
    )
    print()
    print(f"## Summary ({machine})")
    print()
    print(table)
    print()
    print(f"ran in {elapsed / 60:.1f} min: " + ", ".join(timings))
    if failures:
        print("FAILED: " + ", ".join(failures))
    if arguments.markdown:
        Path(arguments.markdown).write_text(f"{machine}\n\n{table}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
