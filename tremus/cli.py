"""The ``tremus`` command: run, protect and back up domains."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

import trio

from tremus._groups import collapse_groups
from tremus._output import EventPrinter
from tremus.domains.base import DomainError
from tremus.domains.registry import create_domain
from tremus.engine.events import Console, DomainStarted, DomainStopped, EventHub

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tremus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a domain unprotected")
    run.add_argument("--domain", required=True, metavar="SPEC",
                     help="e.g. microvm:workload=counter,memory=16M")
    run.add_argument("--duration", type=_duration, metavar="S", help="stop after S seconds")
    run.add_argument("--json", action="store_true", help="one JSON object per line")
    run.set_defaults(handler=cmd_run)
    return parser


async def cmd_run(args: argparse.Namespace) -> int:
    hub = EventHub()
    hub.add_callback(EventPrinter(args.json))
    host = socket.gethostname()
    domain = create_domain(args.domain, console=lambda line: hub.emit(Console(line=line, host=host)))
    reason = "duration elapsed"
    async with trio.open_nursery() as nursery:
        hub.emit(DomainStarted(domain=args.domain, ram_bytes=domain.geometry.ram_size, host=host))
        await nursery.start(domain.run)
        if args.duration is not None:
            await trio.sleep(args.duration)
        else:
            await trio.sleep_forever()
        domain.stop()
    hub.emit(DomainStopped(reason=reason, host=host))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with collapse_groups():
            return trio.run(args.handler, args)
    except KeyboardInterrupt:
        return 130
    except (DomainError, UsageError, OSError) as exc:
        print(f"tremus: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | DomainError) else 1


if __name__ == "__main__":
    sys.exit(main())
