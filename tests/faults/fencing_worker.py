"""A run's owner in its own process, for the fencing test in ``test_fencing.py``.

Run as ``python tests/faults/fencing_worker.py URL WORKER_ID RUN_ID THREAD_ID [options]``. It
connects a :class:`RunRegistry` (``--lease`` and ``--heartbeat`` set the lease), registers the
run, opens its inbox and takes its cancellation token, prints ``ready``, and then reports every
event as one line, flushed at once (``TIME`` is ``time.time()`` when it happened, so the test
can tell what happened before it stopped the process):

``received DECISION_ID ATTEMPTS TIME``
    the inbox yielded a delivery; it is acknowledged next (a decision named by ``--hold-ack``
    only after an ``ack`` line on stdin);
``acked DECISION_ID true|false TIME``
    the ack committed (``false``: it was no longer awaiting one);
``ack-refused DECISION_ID TIME``
    the ack raised :class:`LeaseLostError` (nothing written);
``inbox-lost TIME``
    the inbox raised :class:`LeaseLostError`; it is not read again;
``token-tripped lease_lost=true|false TIME``
    ``token.wait()`` returned (``lease_lost`` says why).

After the inbox is lost or ends it holds until killed (``--timeout`` bounds an orphan). Errors
are printed as ``error TYPE MESSAGE`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from registry import LeaseLostError, RegistrySettings, RunCancellationToken, RunRegistry


def say(line: str) -> None:
    """Send one line to the test, in one write."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def now() -> str:
    return f"{time.time():.6f}"


async def read_stdin_line() -> str:
    """The next line from the test, without blocking the event loop ('' at EOF)."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def report_trip(token: RunCancellationToken) -> None:
    await token.wait()
    # getattr: the same script drives the registry from before fencing, which has no lease_lost
    lost = getattr(token, "lease_lost", None)
    say(f"token-tripped lease_lost={str(lost).lower()} {now()}")


async def own(registry: RunRegistry, options: argparse.Namespace) -> None:
    handle = await registry.register(options.run_id, "agent-a", options.thread_id)
    trip = asyncio.create_task(report_trip(handle.cancellation_token()))
    async with handle.decisions() as inbox:
        say("ready")
        while True:
            try:
                delivery = await asyncio.wait_for(anext(inbox), options.timeout)
            except LeaseLostError:
                say(f"inbox-lost {now()}")
                break
            except StopAsyncIteration:
                say(f"inbox-ended {now()}")
                break
            decision_id = delivery.decision.decision_id
            say(f"received {decision_id} {delivery.attempts} {now()}")
            if decision_id in options.hold_ack:
                line = await asyncio.wait_for(read_stdin_line(), options.timeout)
                if line != "ack":
                    raise RuntimeError(f"expected 'ack' on stdin, got {line!r}")
            try:
                acked = await inbox.ack(delivery)
            except LeaseLostError:
                say(f"ack-refused {decision_id} {now()}")
                continue
            say(f"acked {decision_id} {str(acked).lower()} {now()}")
    await asyncio.sleep(options.timeout)
    trip.cancel()
    raise TimeoutError("nobody killed this worker")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/faults/fencing_worker.py")
    parser.add_argument("url")
    parser.add_argument("worker_id")
    parser.add_argument("run_id")
    parser.add_argument("thread_id")
    parser.add_argument("--lease", type=float, required=True, help="lease_seconds")
    parser.add_argument("--heartbeat", type=float, required=True, help="heartbeat_interval")
    parser.add_argument(
        "--hold-ack",
        action="append",
        default=[],
        metavar="DECISION_ID",
        help="acknowledge this decision only after an 'ack' line on stdin (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="bound on every wait")
    return parser.parse_args(argv)


async def main(options: argparse.Namespace) -> None:
    settings = RegistrySettings(lease_seconds=options.lease, heartbeat_interval=options.heartbeat)
    registry = await RunRegistry.connect(
        options.url, worker_id=options.worker_id, settings=settings
    )
    try:
        await own(registry, options)
    finally:
        await registry.close()


def run(argv: list[str]) -> int:
    try:
        asyncio.run(main(parse(argv)))
    except Exception as exc:
        say(f"error {type(exc).__name__} {exc}".replace("\n", " "))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
