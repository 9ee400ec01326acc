"""A registry client in its own process, driven by a test over stdin/stdout lines.

Run as ``python -m tests.helpers.worker URL ROLE ARGS...``. The worker connects a
:class:`RunRegistry` to ``URL``, sets its role up, prints ``ready``, and then reports what
happened, one line per event (flushed at once; the test reads them with a deadline):

``watch-cancel RUN_ID``
    take the run's cancellation token, print ``ready``, print ``cancelled`` once it trips
    (``timeout`` and exit 1 if it does not within ``--timeout``).
``inbox RUN_ID N``
    open the run's inbox, print ``ready``, then print each delivery as one JSON line
    ``{"delivery_id", "attempts", "decision", "acked"}`` (after acknowledging it, so a test
    that has read the line knows the ack is committed); ``done`` after N deliveries, or
    ``ended`` if the inbox ends first. ``--ack-first K`` acknowledges only the first K
    deliveries, ``--no-ack`` none; ``--hold`` waits to be killed instead of exiting.
``register RUN_ID AGENT THREAD [--on-conflict POLICY]``
    register the run; print ``registered`` (``registered queued`` when it was queued).
``enqueue RUN_ID AGENT THREAD``
    register the run with ``on_conflict="enqueue"``; print ``registered active`` or
    ``registered queued``; then print ``active`` once it is the thread's active run, wait for
    a ``finish`` line on stdin, finish it ``completed`` and print ``finished``.
``register-many THREAD AGENT PREFIX COUNT``
    register ``PREFIX-0`` .. ``PREFIX-{COUNT-1}`` on one thread, all at once; print
    ``registered RUN_ID`` for each, then ``done``.
``cancel RUN_ID``
    request cancellation; print ``cancelled true`` or ``cancelled false``.
``forward RUN_ID JSON_LIST``
    forward the decisions; print ``forwarded RUN_ID`` (where they landed) or ``forwarded none``.

With ``--barrier`` the action roles print ``ready`` once connected and wait for a ``go`` line
on stdin before acting, so a test can start many processes at the same moment. Errors are
printed as ``error TYPE MESSAGE`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from registry import DecisionDelivery, RegistrySettings, RunRegistry, RunStatus

#: printed by every role once it is set up
READY = "ready"


def say(line: str) -> None:
    """Send one line to the test."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def delivery_line(delivery: DecisionDelivery, *, acked: bool) -> str:
    """One delivery as the JSON line the ``inbox`` role prints."""
    return json.dumps(
        {
            "delivery_id": delivery.delivery_id,
            "run_id": delivery.run_id,
            "attempts": delivery.attempts,
            "decision": delivery.decision.to_dict(),
            "acked": acked,
        },
        ensure_ascii=False,
    )


async def read_stdin_line() -> str:
    """The next line from the test (without blocking the event loop)."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def barrier(options: argparse.Namespace) -> None:
    if not options.barrier:
        return
    say(READY)
    line = await asyncio.wait_for(read_stdin_line(), options.timeout)
    if line != "go":
        raise RuntimeError(f"expected 'go' on stdin, got {line!r}")


async def hold(options: argparse.Namespace) -> None:
    # nothing will set this: the test kills the process (the timeout only bounds an orphan)
    await asyncio.wait_for(asyncio.Event().wait(), options.timeout)


async def watch_cancel(registry: RunRegistry, options: argparse.Namespace) -> int:
    handle = await registry.handle_by_run_id(options.run_id)
    if handle is None:
        say("missing")
        return 1
    token = handle.cancellation_token()
    say(READY)
    try:
        await asyncio.wait_for(token.wait(), options.timeout)
    except TimeoutError:
        say("timeout")
        return 1
    say("cancelled")
    return 0


async def inbox(registry: RunRegistry, options: argparse.Namespace) -> int:
    handle = await registry.handle_by_run_id(options.run_id)
    if handle is None:
        say("missing")
        return 1
    ack_first = 0 if options.no_ack else options.ack_first
    received = 0
    async with handle.decisions() as decisions:
        say(READY)
        while received < options.count:
            try:
                delivery = await asyncio.wait_for(anext(decisions), options.timeout)
            except StopAsyncIteration:
                say("ended")
                return 0
            except TimeoutError:
                say("timeout")
                return 1
            acked = False
            if ack_first is None or received < ack_first:
                acked = await decisions.ack(delivery)
            received += 1
            say(delivery_line(delivery, acked=acked))
        if options.hold:
            await hold(options)
        say("done")
    return 0


async def register(registry: RunRegistry, options: argparse.Namespace) -> int:
    await barrier(options)
    handle = await registry.register(
        options.run_id, options.agent_id, options.thread_id, on_conflict=options.on_conflict
    )
    say("registered queued" if handle.record.status is RunStatus.QUEUED else "registered")
    return 0


async def enqueue(registry: RunRegistry, options: argparse.Namespace) -> int:
    await barrier(options)
    handle = await registry.register(
        options.run_id, options.agent_id, options.thread_id, on_conflict="enqueue"
    )
    say(f"registered {handle.record.status.value}")
    await handle.wait_active(options.timeout)
    say("active")
    line = await asyncio.wait_for(read_stdin_line(), options.timeout)
    if line != "finish":
        raise RuntimeError(f"expected 'finish' on stdin, got {line!r}")
    say(f"finished {str(await handle.finish('completed')).lower()}")
    return 0


async def register_many(registry: RunRegistry, options: argparse.Namespace) -> int:
    await barrier(options)

    async def one(index: int) -> None:
        handle = await registry.register(
            f"{options.prefix}-{index}", options.agent_id, options.thread_id
        )
        say(f"registered {handle.run_id}")

    await asyncio.gather(*(one(index) for index in range(options.count)))
    say("done")
    return 0


async def cancel(registry: RunRegistry, options: argparse.Namespace) -> int:
    await barrier(options)
    cancelled = await registry.cancel_active_run_by_id(options.run_id)
    say(f"cancelled {'true' if cancelled else 'false'}")
    return 0


async def forward(registry: RunRegistry, options: argparse.Namespace) -> int:
    decisions: list[dict[str, Any]] = json.loads(options.decisions)
    await barrier(options)
    forwarded = await registry.forward_decisions_by_run_id(options.run_id, decisions)
    say(f"forwarded {'none' if forwarded is None else forwarded.run_id}")
    return 0


ROLES = {
    "watch-cancel": (watch_cancel, True),
    "inbox": (inbox, True),
    "register": (register, False),
    "enqueue": (enqueue, True),
    "register-many": (register_many, False),
    "cancel": (cancel, False),
    "forward": (forward, False),
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.worker")
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=30.0, help="bound on every wait")
    parser.add_argument(
        "--safety-interval",
        type=float,
        default=60.0,
        help="long by default, so that only notifications wake this process in time",
    )
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--barrier", action="store_true", help="wait for 'go' on stdin")
    roles = parser.add_subparsers(dest="role", required=True)

    role = roles.add_parser("watch-cancel")
    role.add_argument("run_id")

    role = roles.add_parser("inbox")
    role.add_argument("run_id")
    role.add_argument("count", type=int)
    role.add_argument("--ack-first", type=int, default=None)
    role.add_argument("--no-ack", action="store_true")
    role.add_argument("--hold", action="store_true")

    role = roles.add_parser("register")
    role.add_argument("run_id")
    role.add_argument("agent_id")
    role.add_argument("thread_id")
    role.add_argument("--on-conflict", default="supersede")

    role = roles.add_parser("enqueue")
    role.add_argument("run_id")
    role.add_argument("agent_id")
    role.add_argument("thread_id")

    role = roles.add_parser("register-many")
    role.add_argument("thread_id")
    role.add_argument("agent_id")
    role.add_argument("prefix")
    role.add_argument("count", type=int)

    role = roles.add_parser("cancel")
    role.add_argument("run_id")

    role = roles.add_parser("forward")
    role.add_argument("run_id")
    role.add_argument("decisions", help="a JSON list of decisions")

    options = parser.parse_args(argv)
    if options.role == "inbox" and options.no_ack:
        options.hold = True
    return options


async def main(argv: list[str]) -> int:
    options = parse(argv)
    run_role, listens = ROLES[options.role]
    settings = RegistrySettings(
        safety_interval=options.safety_interval, pool_size=options.pool_size
    )
    registry = await RunRegistry.connect(
        options.url, worker_id=options.worker_id, settings=settings, listen=listens
    )
    try:
        return await run_role(registry, options)
    finally:
        await registry.close()


def run(argv: list[str]) -> int:
    try:
        return asyncio.run(main(argv))
    except Exception as exc:
        say(f"error {type(exc).__name__} {exc}".replace("\n", " "))
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
