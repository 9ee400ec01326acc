"""A registry client in its own process, for the kill tests in ``test_kills.py``.

Run as ``python tests/faults/worker.py ROLE URL ARGS...``. Every role connects a
:class:`RunRegistry`, prints one line per event (flushed at once, so the test can read it with
a deadline and then ``SIGKILL`` the process knowing exactly what it had done), and waits for the
test on stdin where it says so. A role that would otherwise wait forever is bounded by
``--timeout``, so a process orphaned by a crashed test ends on its own.

``inbox URL WORKER_ID RUN_ID [--register THREAD] [--ack]``
    with ``--register``, register the run (owned by ``WORKER_ID``); without it, continue it with
    ``resume_owned_runs()`` and print ``resumed RUN_ID...``. Then open the run's inbox, print
    ``ready``, and print each delivery as a JSON line ``{"decision_id", "attempts", "acked"}``,
    after the ack has committed (with ``--ack``; without it nothing is acknowledged).
``forward-loop URL RUN_ID PREFIX BATCH``
    forward batches of ``BATCH`` decisions whose ids start with ``PREFIX-N-`` for N = 0, 1, ...
    until killed, printing ``sending PREFIX-N`` before and ``forwarded PREFIX-N`` after each.
``own URL WORKER_ID COUNT [--queued]``
    register ``run-0`` .. ``run-{COUNT-1}`` (one thread each; with ``--queued``, also
    ``queued-N`` enqueued behind each ``run-N``), print ``ready``, and keep their leases alive
    with the heartbeat until killed.
``adopt URL WORKER_ID``
    print ``ready``; after a ``go`` line, call ``adopt_orphaned_runs`` in a loop, printing
    ``adopted RUN_ID...`` for every non-empty result and ``idle`` once it has seen nothing for
    ``--idle-after`` seconds; on a ``stop`` line, leave the loop, print ``stopped N`` and hold
    (closing would release the leases, and another adopter would take the runs again).
``register-race URL THREAD COUNT``
    fork ``COUNT`` processes (after the imports, which would take most of a minute if each of
    fifty processes did them on two cores). Each connects its own registry, prints ``ready
    INDEX`` and waits for the starting gun; on a ``go`` line this process fires it (closes a
    pipe that every child is reading, so all wake at once), each registers ``run-INDEX`` (two
    digits) on ``THREAD`` and prints ``registered RUN_ID``. Then it prints ``exit INDEX CODE``
    for every child and ``done``. Start it in its own session: killing the process group
    kills every child.

Errors are printed as ``error TYPE MESSAGE`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from registry import RegistrySettings, RunRegistry


def say(line: str) -> None:
    """Send one line to the test, in one write: lines of forked children never interleave."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


async def read_stdin_line() -> str:
    """The next line from the test, without blocking the event loop ('' at EOF)."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def expect_line(expected: str, options: argparse.Namespace) -> None:
    line = await asyncio.wait_for(read_stdin_line(), options.timeout)
    if line != expected:
        raise RuntimeError(f"expected {expected!r} on stdin, got {line!r}")


async def hold(options: argparse.Namespace) -> None:
    """Wait to be killed (the timeout only bounds an orphan)."""
    await asyncio.sleep(options.timeout)
    raise TimeoutError("nobody killed this worker")


async def inbox(registry: RunRegistry, options: argparse.Namespace) -> None:
    if options.register is not None:
        handle = await registry.register(options.run_id, "agent-a", options.register)
    else:
        resumed = await registry.resume_owned_runs()
        say("resumed " + " ".join(handle.run_id for handle in resumed))
        [handle] = [handle for handle in resumed if handle.run_id == options.run_id]
    async with handle.decisions() as decisions:
        say("ready")
        while True:
            delivery = await asyncio.wait_for(anext(decisions), options.timeout)
            acked = await decisions.ack(delivery) if options.ack else False
            say(
                json.dumps(
                    {
                        "decision_id": delivery.decision.decision_id,
                        "attempts": delivery.attempts,
                        "acked": acked,
                    }
                )
            )


def batch_of(prefix: str, size: int) -> list[dict[str, Any]]:
    return [
        {
            "target_id": f"{prefix}-call-{index}",
            "decision_id": f"{prefix}-{index}",
            "action": "resume",
            "result": {"index": index, "text": "x" * 64},
            "updated_at": 1_700_000_000_000 + index,
        }
        for index in range(size)
    ]


async def forward_loop(registry: RunRegistry, options: argparse.Namespace) -> None:
    number = 0
    while True:
        prefix = f"{options.prefix}-{number}"
        batch = batch_of(prefix, options.batch)
        say(f"sending {prefix}")
        forwarded = await registry.forward_decisions_by_run_id(options.run_id, batch)
        if forwarded is None:
            raise RuntimeError(f"run {options.run_id} is not active")
        say(f"forwarded {prefix}")
        number += 1


async def own(registry: RunRegistry, options: argparse.Namespace) -> None:
    for index in range(options.count):
        await registry.register(f"run-{index}", "agent-a", f"thread-{index}")
        if options.queued:
            await registry.register(
                f"queued-{index}", "agent-a", f"thread-{index}", on_conflict="enqueue"
            )
    say("ready")
    await hold(options)


async def adopt(registry: RunRegistry, options: argparse.Namespace) -> None:
    say("ready")
    await expect_line("go", options)
    stop = asyncio.create_task(expect_line("stop", options))
    loop = asyncio.get_running_loop()
    adopted = 0
    idle_since = loop.time()
    said_idle = False
    while not stop.done():
        handles = await registry.adopt_orphaned_runs(limit=options.limit)
        if handles:
            adopted += len(handles)
            say("adopted " + " ".join(handle.run_id for handle in handles))
            continue
        if not said_idle and loop.time() - idle_since >= options.idle_after:
            said_idle = True
            say("idle")
        # pacing between polls, so three adopters do not starve the owner's heartbeat
        await asyncio.wait({stop}, timeout=options.poll)
    await stop  # raises if stdin said something else
    say(f"stopped {adopted}")
    await hold(options)


def register_race(options: argparse.Namespace) -> int:
    # no event loop, thread or connection exists yet: forking now is safe
    gun_read, gun_write = os.pipe()
    children: dict[int, int] = {}
    for index in range(options.count):
        pid = os.fork()
        if pid == 0:
            os.close(gun_write)
            os._exit(racer(options, index, gun_read))
        children[pid] = index
    os.close(gun_read)
    line = sys.stdin.readline().strip()  # EOF ('') if the test is gone: the children time out
    if line != "go":
        raise RuntimeError(f"expected 'go' on stdin, got {line!r}")
    os.close(gun_write)  # every child's read returns EOF at the same moment
    while children:
        pid, status = os.wait()
        say(f"exit {children.pop(pid)} {os.waitstatus_to_exitcode(status)}")
    say("done")
    return 0


def racer(options: argparse.Namespace, index: int, gun: int) -> int:
    """One forked child of ``register-race``; returns its exit status."""
    try:
        asyncio.run(race(options, f"run-{index:02}", index, gun))
    except BaseException as exc:
        say(f"error {type(exc).__name__} {exc}".replace("\n", " "))
        return 2
    return 0


async def race(options: argparse.Namespace, run_id: str, index: int, gun: int) -> None:
    registry = await RunRegistry.connect(options.url, settings=settings_of(options), listen=False)
    try:
        fired = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(gun, fired.set)
        say(f"ready {index}")
        try:
            await asyncio.wait_for(fired.wait(), options.timeout)
        finally:
            loop.remove_reader(gun)
        if os.read(gun, 1) != b"":
            raise RuntimeError("the starting gun pipe carried data instead of closing")
        handle = await registry.register(run_id, f"agent-{index % 3}", options.thread_id)
        say(f"registered {handle.run_id}")
    finally:
        await registry.close()


Role = Callable[[RunRegistry, argparse.Namespace], Awaitable[None]]

#: each role and whether it needs the LISTEN connection (only the inbox waits on wake-ups)
ROLES: dict[str, tuple[Role, bool]] = {
    "inbox": (inbox, True),
    "forward-loop": (forward_loop, False),
    "own": (own, False),
    "adopt": (adopt, False),
}


def parse(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url")
    common.add_argument("--timeout", type=float, default=120.0, help="bound on every wait")
    common.add_argument("--lease", type=float, default=15.0, help="lease_seconds")
    common.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat_interval")
    common.add_argument("--pool-size", type=int, default=2)

    parser = argparse.ArgumentParser(prog="tests/faults/worker.py")
    roles = parser.add_subparsers(dest="role", required=True)

    role = roles.add_parser("inbox", parents=[common])
    role.add_argument("worker_id")
    role.add_argument("run_id")
    role.add_argument("--register", metavar="THREAD", default=None)
    role.add_argument("--ack", action="store_true")

    role = roles.add_parser("forward-loop", parents=[common])
    role.add_argument("run_id")
    role.add_argument("prefix")
    role.add_argument("batch", type=int)

    role = roles.add_parser("own", parents=[common])
    role.add_argument("worker_id")
    role.add_argument("count", type=int)
    role.add_argument("--queued", action="store_true", help="and queued-N behind each run-N")

    role = roles.add_parser("adopt", parents=[common])
    role.add_argument("worker_id")
    role.add_argument("--limit", type=int, default=5)
    role.add_argument("--poll", type=float, default=0.02, help="seconds between empty polls")
    role.add_argument("--idle-after", type=float, default=1.5)

    role = roles.add_parser("register-race", parents=[common])
    role.add_argument("thread_id")
    role.add_argument("count", type=int)

    return parser.parse_args(argv)


def settings_of(options: argparse.Namespace) -> RegistrySettings:
    return RegistrySettings(
        lease_seconds=options.lease,
        heartbeat_interval=options.heartbeat,
        pool_size=options.pool_size,
    )


async def main(options: argparse.Namespace) -> None:
    run_role, listens = ROLES[options.role]
    registry = await RunRegistry.connect(
        options.url,
        worker_id=getattr(options, "worker_id", None),
        settings=settings_of(options),
        listen=listens,
    )
    try:
        await run_role(registry, options)
    finally:
        await registry.close()


def run(argv: list[str]) -> int:
    options = parse(argv)
    try:
        if options.role == "register-race":
            return register_race(options)
        asyncio.run(main(options))
    except Exception as exc:
        say(f"error {type(exc).__name__} {exc}".replace("\n", " "))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
