"""Hostile input and hostile stored text: never a traceback, exit 2 for every bad input.

Stored ids, reasons and owner ids are data, not markup: the tables print them literally, with
terminal control characters shown as escapes (``\\x1b``) rather than sent to the terminal.
Input the command cannot use (JSON nested too deeply, a file that is not UTF-8, a duration
that overflows, a port that is not one, a number out of range, an argument that is not
UTF-8) is a usage error: exit 2 and one line naming what was wrong. The property test at the
end runs every command on arbitrary hostile argument lists, in-process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import RunRegistry
from registry.cli import main
from tests.cli.runner import NO_EMBEDDED_SERVER, assert_error, registry

#: a decision the runtime would send
DECISION = '{"target_id": "call-1", "action": "resume", "updated_at": 1}'

#: stored text that rich would read as markup, and terminal control sequences
MARKUP_RUN = "run[/]"
MARKUP_AGENT = "agent[bold red]x[/]"
ESCAPE_THREAD = "thread\x1b[31m"
ESCAPE_OWNER = "owner[/]\x1b[1m"
MARKUP_TARGET = "call[/]"
MARKUP_DECISION = "[bold]d"


@dataclass(frozen=True)
class Outcome:
    """What one in-process command did."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"registry {self.args!r} -> exit {self.code}\nstdout: {self.out[-2000:]!r}\n" + (
            f"stderr: {self.err[-2000:]!r}"
        )


def run_main(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    """``registry *args`` in this process (for speed), with its output."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return Outcome(tuple(args), code, captured.out, captured.err)


def assert_usage_error(outcome: Outcome, *fragments: str) -> None:
    """Exit 2 and exactly one line on stderr, naming ``fragments``."""
    assert outcome.code == 2, str(outcome)
    lines = outcome.err.splitlines()
    assert len(lines) == 1, str(outcome)
    assert lines[0].startswith("registry: error: "), str(outcome)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture(autouse=True)
def no_database_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # in-process commands without --database-url fail at once instead of starting a server
    monkeypatch.setenv("REGISTRY_DATA_DIR", NO_EMBEDDED_SERVER)
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


# --- stored text ----------------------------------------------------------------------------------


async def seed_hostile_text(url: str) -> None:
    """A superseded run and its successor whose ids, owner and reasons hold markup and ESC."""
    owner = await RunRegistry.connect(url, worker_id=ESCAPE_OWNER)
    async with owner:
        await owner.register("run-old", MARKUP_AGENT, ESCAPE_THREAD)
        decision = {
            "target_id": MARKUP_TARGET,
            "decision_id": MARKUP_DECISION,
            "action": "resume",
            "result": {"[red]k[/]": "[/]v\x1b[2J"},
            "reason": "[link=x]r[/link]",
            "updated_at": 1,
        }
        await owner.forward_decisions_by_run_id("run-old", [decision])
        # the successor supersedes run-old and drops its decision with a reason naming it
        await owner.register(MARKUP_RUN, MARKUP_AGENT, ESCAPE_THREAD)


async def test_stored_markup_and_control_characters_print_literally(
    registry_database_url: str,
) -> None:
    await seed_hostile_text(registry_database_url)
    url = ("--database-url", registry_database_url)
    runs, audit, show, show_new = await asyncio.gather(
        registry("runs", *url),
        registry("audit", *url),
        registry("run", "show", "run-old", *url),
        registry("run", "show", MARKUP_RUN, *url),
    )
    escaped_thread = "thread\\x1b[31m"
    escaped_owner = "owner[/]\\x1b[1m"
    for result in (runs, audit, show, show_new):
        assert result.code == 0, str(result)
        assert result.stderr == "", str(result)
        assert "\x1b" not in result.stdout, str(result)
    for text in (MARKUP_RUN, "run-old", MARKUP_AGENT, escaped_thread, escaped_owner):
        assert text in runs.stdout, f"{text!r} not in {runs}"
    for text in (MARKUP_RUN, MARKUP_AGENT, MARKUP_TARGET, MARKUP_DECISION):
        assert text in audit.stdout, f"{text!r} not in {audit}"
    assert "superseded by run run[/]" in audit.stdout, str(audit)
    for text in (MARKUP_AGENT, escaped_thread, escaped_owner, MARKUP_TARGET, MARKUP_DECISION):
        assert text in show.stdout, f"{text!r} not in {show}"
    assert "superseded by run run[/]" in show.stdout, str(show)
    assert MARKUP_RUN in show_new.stdout, str(show_new)


# --- each input of the issue ----------------------------------------------------------------------

#: arguments the command line cannot use, and what its one-line error must name
BAD_INPUT = [
    (("forward", "run-1", "--decision", "[" * 10_000 + "]" * 10_000), ("--decision", "deep")),
    (("forward", "run-1", "--decision", '{"a":' * 5_000 + "1" + "}" * 5_000), ("--decision",)),
    (("audit", "--since", "3000000d"), ("--since",)),
    (("audit", "--since", "0001-01-01"), ("--since",)),
    (("prune", "--older-than", "99999999999d"), ("--older-than",)),
    (("prune", "--older-than", "999999999d"), ("--older-than",)),
    (("runs", "--limit", "99999999999999999999"), ("--limit",)),
    (("audit", "--limit", "99999999999999999999"), ("--limit",)),
    (("tail", "run-1", "--from", "99999999999999999999"), ("--from",)),
    (("--connect-timeout", "nan", "runs"), ("--connect-timeout",)),
    (("--connect-timeout", "inf", "runs"), ("--connect-timeout",)),
    (("--connect-timeout", "1e400", "runs"), ("--connect-timeout",)),
]

#: URLs whose port is not a port (or whose host list the driver cannot read)
BAD_PORTS = [
    "postgresql://u@127.0.0.1:abc/x",
    "postgresql://u@127.0.0.1:99999/x",
    "postgresql://u@[::1/x",
    "postgresql://u@127.0.0.1:-1/x",
    "postgresql://u@/x?host=127.0.0.1:99999",
    "postgresql://u@/x?host=127.0.0.1&port=0",
    "postgresql://u@/x?host=[::1]:abc",
    "postgresql://u@a,,b/x",
]


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUT, ids=lambda v: repr(v)[:40])
def test_bad_input_is_a_usage_error(
    args: tuple[str, ...],
    fragments: tuple[str, ...],
    registry_database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a real database, so that nothing but the check of the input can refuse
    outcome = run_main([*args, "--database-url", registry_database_url], capsys)
    assert_usage_error(outcome, *fragments)


@pytest.mark.parametrize("url", BAD_PORTS)
@pytest.mark.parametrize("where", ["option", "group option", "environment"])
def test_a_bad_port_is_a_usage_error(
    url: str, where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "option":
        outcome = run_main(["runs", "--database-url", url], capsys)
        assert_usage_error(outcome, "--database-url")
    elif where == "group option":
        outcome = run_main(["--database-url", url, "cancel", "r"], capsys)
        assert_usage_error(outcome, "--database-url")
    else:
        monkeypatch.setenv("REGISTRY_DATABASE_URL", url)
        assert_usage_error(run_main(["status"], capsys), "REGISTRY_DATABASE_URL")


@pytest.mark.parametrize("port", ["99999", "abc"])
def test_a_bad_pgport_is_a_usage_error(
    port: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the driver reads $PGPORT when the URL names no port
    monkeypatch.setenv("PGPORT", port)
    outcome = run_main(["runs", "--database-url", "postgresql://u@127.0.0.1/x"], capsys)
    assert_usage_error(outcome, "$PGPORT", repr(port))


def test_a_decision_file_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "decision.bin"
    binary.write_bytes(b"\xff\xfe\x00\x9c" + bytes(range(256)))
    outcome = run_main(
        ["forward", "run-1", "--decision", f"@{binary}", "--database-url", "postgresql://x@h/d"],
        capsys,
    )
    assert_usage_error(outcome, "--decision", str(binary), "UTF-8")


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ('{"target_id": "c", "action": "resume", "result": "a\\u0000b", "updated_at": 1}', "NUL"),
        ('{"target_id": "c", "action": "resume", "result": NaN, "updated_at": 1}', "non-finite"),
        ('{"target_id": "c", "action": "resume", "result": [1e400], "updated_at": 1}', "finite"),
        ('{"target_id": "c", "action": "resume", "updated_at": 99999999999999999999}', "between"),
        # more digits than Python converts: json.loads raised a bare ValueError
        (
            '{"target_id": "c", "action": "resume", "result": ' + "9" * 5000 + ', "updated_at": 1}',
            "--decision: not JSON",
        ),
    ],
    ids=["nul", "nan", "infinity", "huge-updated-at", "long-integer"],
)
def test_a_decision_postgresql_cannot_store_is_a_usage_error(
    document: str, fragment: str, registry_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(register_run(registry_database_url, "run-1"))
    outcome = run_main(
        ["forward", "run-1", "--decision", document, "--database-url", registry_database_url],
        capsys,
    )
    assert_usage_error(outcome, fragment)


async def register_run(url: str, run_id: str) -> None:
    owner = await RunRegistry.connect(url, worker_id="test-owner")
    async with owner:
        await owner.register(run_id, "agent-a", f"thread-of-{run_id}")


@pytest.mark.parametrize(
    "args",
    [
        ("runs", "--database-url", "postgresql://u@127.0.0.1:1/x\udcff"),
        ("runs", "--thread", "t\udcff"),
        ("forward", "r", "--decision", "\udcff"),
        ("audit", "--format", "t\udcff"),
    ],
    ids=["url", "thread", "decision", "format"],
)
async def test_an_argument_that_is_not_utf8_is_a_usage_error(args: tuple[str, ...]) -> None:
    # a subprocess, so that the bytes reach it through sys.argv as the shell would pass them
    result = await registry(*args)
    assert_error(result, 2, "not valid UTF-8")


def test_an_unexpected_exception_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the last line of defence: a bug anywhere is one line and exit 1, never a traceback
    def explode() -> None:
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr("registry.cli.embedded_data_dir", explode)
    outcome = run_main(["db", "status"], capsys)
    assert outcome.code == 1, str(outcome)
    assert outcome.err == "registry: error: internal error: ZeroDivisionError: boom second line\n"


def test_with_vv_the_unexpected_exception_is_logged(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode() -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("registry.cli.embedded_data_dir", explode)
    caplog.set_level(logging.DEBUG, logger="registry.cli")
    outcome = run_main(["-vv", "db", "status"], capsys)
    assert outcome.code == 1, str(outcome)
    [record] = [record for record in caplog.records if record.name == "registry.cli"]
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError


def test_an_error_message_cannot_reach_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    # the URL is repeated in the message; click strips whole ANSI sequences when stderr is not
    # a terminal (as here), so a lone ESC and a BEL stand for what a terminal would receive
    outcome = run_main(["runs", "--database-url", "postgresql://u@127.0.0.1:1/x\x1b\x07"], capsys)
    assert outcome.code == 1, str(outcome)
    assert outcome.err.startswith("registry: error: cannot reach the database"), str(outcome)
    assert "x\\x1b\\x07" in outcome.err, str(outcome)
    assert "\x1b" not in outcome.err, str(outcome)
    assert "\x07" not in outcome.err, str(outcome)


# --- the property: any argument list --------------------------------------------------------------

#: text chosen to break parsers and renderers
HOSTILE_WORDS = [
    *("[/]", "[bold red]x[/]", "[link=file:///etc/passwd]x", "\x1b[31m", "\x1b[2J\x1b[H"),
    *("\x00", "a\x00b", "\udcff", "\ud800", "\u202e", "\r", "\n", "\t", "\x07", "\x9b31m"),
    *("", " ", "-", "--", "-h", "-v", "-vv", "--json", "@", "@-", "@/dev/null", "@/nonexistent"),
    *("0", "-1", "1", "99999999999999999999", "9223372036854775808", "1e400", "nan", "inf"),
    *("-inf", "0.0", "1e-300", "0x10", "1_000", "3000000d", "99999999999d", "999999999d"),
    *("7d", "1h30m", "0s", "0001-01-01", "9999-12-31T23:59:59-14:00", "2026-02-30", "yesterday"),
    *("active", "completed", "table", "json", "csv", "run-active", "run-ended", "thread-1"),
    *(MARKUP_RUN, MARKUP_AGENT, ESCAPE_THREAD, "agent-a", ":smile:", "🙂", "\ufeff", "x" * 300),
    *("[" * 10_000, "[" * 3000 + "]" * 3000, '{"a":' * 2000 + "1" + "}" * 2000, DECISION),
    *("{}", "[]", "null", "NaN", '"text"', '{"target_id": "c", "action": "resume"}'),
    '[{"target_id": "[/]", "action": "cancel", "result": {"[b]": "\\u001b[31m"}, "updated_at": 1}]',
    '{"target_id": "c", "action": "resume", "result": "\\u0000", "updated_at": 1}',
    '{"target_id": "c\\u0000", "action": "resume", "updated_at": 1}',
    '{"target_id": "c", "action": "resume", "result": 1e999, "updated_at": 1}',
    '{"target_id": "c", "action": "resume", "updated_at": 1e400}',
]

#: databases a hostile --database-url may name (none that takes long to not answer)
HOSTILE_URLS = [
    *(
        "postgresql://u@127.0.0.1:abc/x",
        "postgresql://u@127.0.0.1:99999/x",
        "postgresql://u@[::1/x",
    ),
    *("postgresql://u@127.0.0.1:1/x", "mysql://u@127.0.0.1/x", "", "postgresql://", "[/]"),
    *("postgresql://u@127.0.0.1:1/x\x1b[31m", "postgresql://u@127.0.0.1:1/[bold]x[/]"),
]

hostile_text = st.one_of(
    st.sampled_from(HOSTILE_WORDS),
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Ps", "Pe", "Sm"]), max_size=8),
    st.integers().map(str),
    st.floats().map(str),
    st.lists(st.sampled_from(HOSTILE_WORDS[:12]), min_size=2, max_size=4).map("".join),
)


@dataclass(frozen=True)
class Command:
    """A command's words, the options and flags it takes, whether it takes RUN and a database.

    ``required`` options are always given (else nearly every example is a usage error).
    """

    words: tuple[str, ...]
    options: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    positional: bool = False
    database: bool = True


COMMANDS = {
    "runs": Command(("runs",), ("--thread", "--agent", "--status", "--limit"), ("--json",)),
    "run show": Command(("run", "show"), (), ("--json",), positional=True),
    "audit": Command(
        ("audit",), ("--thread", "--run", "--agent", "--since", "--limit", "--format")
    ),
    "forward": Command(
        ("forward",), ("--thread", "--agent"), ("--json",), ("--decision",), positional=True
    ),
    "cancel": Command(("cancel",), ("--thread",), positional=True),
    # never --follow: it would wait for a live run to end
    "tail": Command(("tail",), ("--from",), ("--json",), positional=True),
    "prune": Command(("prune",), (), (), ("--older-than",)),
    "status": Command(("status",), (), ("--json",)),
    "migrate --sql": Command(("migrate", "--sql")),
    "db status": Command(("db", "status"), (), ("--json",), database=False),
}


#: values each option takes when used as meant, mostly the seeded runs' (see the seed below)
USABLE = {
    "--thread": ("thread-1", "thread-2", ESCAPE_THREAD),
    "--agent": ("agent-a", MARKUP_AGENT),
    "--run": ("run-old", MARKUP_RUN, "run-active"),
    "--status": ("active", "completed", "superseded", "cancelled"),
    "--limit": ("1", "50", "9223372036854775807"),
    "--since": ("7d", "1h30m", "2026-01-01", "2026-01-01T12:00+14:00"),
    "--format": ("table", "json", "csv"),
    "--decision": (
        DECISION,
        '[{"target_id": "[/]\\u001b[31m", "decision_id": "[b]", "action": "cancel",'
        ' "result": {"[red]": "\\u009b2J"}, "reason": "[/]", "updated_at": 1}]',
    ),
    "--from": ("1", "2", "9223372036854775807"),
    "--older-than": ("7d", "0s", "365000d"),
}
#: the runs the seed stores
SEEDED_RUNS = ("run-active", "run-ended", "run-old", MARKUP_RUN)


def value_of(option: str) -> st.SearchStrategy[str]:
    """Mostly a usable value of ``option``, else hostile text."""
    usable = st.sampled_from(USABLE[option])
    return st.integers(0, 3).flatmap(lambda n: hostile_text if n == 3 else usable)


@st.composite
def argument_lists(draw: st.DrawFn, command: Command, url: str) -> list[str]:
    """``command`` with hostile group options, options, RUN and stray words, in any order.

    Hypothesis leans to small numbers, so the rare choices are the high ones.
    """
    args: list[str] = []
    if draw(st.integers(0, 4)) == 4:
        args += ["--connect-timeout", draw(st.sampled_from(["0.5", "nan", "inf", "-1", "1e400"]))]
    if draw(st.integers(0, 4)) == 4:
        args += ["--database-url", draw(st.sampled_from(HOSTILE_URLS))]
    args += command.words
    tail: list[list[str]] = []
    if command.database:
        hostile = draw(st.integers(0, 3)) == 3
        tail.append(["--database-url", draw(st.sampled_from(HOSTILE_URLS)) if hostile else url])
    chosen = list(command.required)
    if command.options:
        chosen += draw(st.lists(st.sampled_from(command.options), max_size=3, unique=True))
    tail += [[option, draw(value_of(option))] for option in chosen]
    tail += [[flag] for flag in command.flags if draw(st.booleans())]
    if command.positional and draw(st.integers(0, 5)) < 5:
        hostile = draw(st.integers(0, 3)) == 3
        tail.append([draw(hostile_text if hostile else st.sampled_from(SEEDED_RUNS))])
    if draw(st.integers(0, 3)) == 3:
        tail.append([draw(hostile_text)])
    for group in draw(st.permutations(tail)):
        args += group
    return args


async def seed_for_the_property(url: str) -> None:
    """An active run with a stream, an ended one, and the hostile text of the test above."""
    await seed_hostile_text(url)
    owner = await RunRegistry.connect(url, worker_id="seed-owner")
    async with owner:
        active = await owner.register("run-active", "agent-a", "thread-1")
        await active.bind_stream_fanout()
        await active.publish_many([b"chunk one\n", b"chunk two\n"])
        await owner.register("run-ended", "agent-a", "thread-2")
        await owner.remove_by_run_id("run-ended")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_argument_list_gives_a_traceback(
    name: str, registry_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(seed_for_the_property(registry_database_url))
    command = COMMANDS[name]

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(argument_lists(command, registry_database_url))
    def check(args: list[str]) -> None:
        outcome = run_main(args, capsys)
        assert outcome.code in (0, 1, 2), str(outcome)
        for stream in (outcome.out, outcome.err):
            assert "Traceback" not in stream, str(outcome)
        assert "internal error" not in outcome.err, str(outcome)
        assert "\x1b" not in outcome.err, str(outcome)
        lines = outcome.err.splitlines()
        assert len(lines) <= 1, str(outcome)
        assert all(line.startswith("registry: ") for line in lines), str(outcome)
        if outcome.code == 2:
            assert lines, str(outcome)
            assert lines[0].startswith("registry: error: "), str(outcome)
        if "--help" not in args and "-h" not in args and "csv" not in args and name != "tail":
            # tables escape what they print; csv and a stream's bytes are data, as stored
            assert "\x1b" not in outcome.out, str(outcome)

    check()
