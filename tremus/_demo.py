"""``tremus demo``: protect a counter micro-VM, kill the primary, watch the backup take over.

Runs a real backup and a real primary as two OS processes on loopback, lets them
checkpoint for a while, SIGKILLs the primary, and shows the guest's counter going on
on the backup from its last acknowledged checkpoint. The guest's console lines are
held until their checkpoint is acknowledged, like its network output, so the backup
prints the next line and none twice.

With ``--json`` every event of both processes is one JSON line (``who``: ``primary``
or ``backup``), and the last line is the ``demo_summary``: the verdict and the
figures it rests on.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from typing import Any, TextIO

import trio

from tremus.testing.procs import TremusProcess, start_tremus

__all__ = ["run_demo"]


_COUNTER = re.compile(r"^counter (\d+)$")

#: The verdict when the counter went on on the backup (the human mode's last line).
VERDICT_OK = "OK"
VERDICT_FAILED = "FAILED: the counter did not continue"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counters(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := _COUNTER.match(line))]


def _summary(primary: TremusProcess | None, backup: TremusProcess,
             verdict: str, ok: bool) -> dict[str, Any]:
    """The ``demo_summary`` event: the verdict, and the figures it rests on, from what
    the two processes printed."""
    printed = ([e["line"] for e in primary.events if e["event"] == "console"]
               if primary is not None else [])
    resumed = [e["line"] for e in backup.events if e["event"] == "console"]
    acked = primary.of("checkpoint_acked") if primary is not None else []
    complete = backup.of("failover_complete")
    before, after = _counters(printed), _counters(resumed)
    seen = set(before)
    missing = after[0] - before[-1] - 1 if before and after else 0
    return {
        "who": "demo", "event": "demo_summary", "ok": ok, "verdict": verdict,
        "downtime_ms": float(complete[0]["downtime_ms"]) if complete else -1.0,
        "failover_epoch": int(complete[0]["epoch"]) if complete else -1,
        "last_acked_epoch": max((int(a["epoch"]) for a in acked), default=-1),
        "primary_last_line": printed[-1] if printed else "",
        "backup_first_line": resumed[0] if resumed else "",
        "lines_repeated": sum(1 for n in after if n in seen),
        "lines_missing": max(missing, 0),
        "checkpoints_acked": len(acked),
        "checkpoints_applied": len(backup.of("checkpoint_applied")),
    }


async def run_demo(seconds: float, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Returns 0 when the counter continued on the backup from the last acked checkpoint,
    repeating no line the primary printed. With ``as_json`` the last line written is
    the ``demo_summary`` event."""

    def say(text: str) -> None:
        if not as_json:
            out.write(text + "\n")
            out.flush()

    def show(child: TremusProcess, event: dict[str, Any]) -> None:
        who = child.name
        if as_json:
            out.write(json.dumps({"who": who, **event}) + "\n")
            out.flush()
            return
        name = event["event"]
        if name == "console":
            say(f"  [{who:7}] guest: {event['line']}")
        elif name == "checkpoint_acked" and event["epoch"] % 20 == 0:
            say(f"  [{who:7}] checkpoint {event['epoch']} acked: {event['dirty_pages']} pages, "
                f"pause {event['pause_us']:.0f} µs, {event['bytes_sent']} bytes")
        elif name in ("protection_started", "backup_ready", "failover_started",
                      "failover_complete", "primary_connected"):
            detail = {k: v for k, v in event.items() if k not in ("event", "time")}
            say(f"  [{who:7}] {name} {detail}")

    port = _free_port()
    spec = "microvm:workload=counter,memory=16M,interval_ms=200"
    say(f"tremus demo: a counter micro-VM protected over tcp://127.0.0.1:{port}")
    ok = False
    verdict = VERDICT_FAILED
    summary: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                    f"127.0.0.1:{port}", "--json")
        backup.on_event(show)
        primary: TremusProcess | None = None
        try:
            await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
            primary = await start_tremus(nursery, "primary", "protect", "--domain", spec,
                                         "--backup", f"127.0.0.1:{port}", "--interval", "50",
                                         "--json")
            primary.on_event(show)
            await primary.wait_for(lambda p: p.of("protection_started"),
                                   what="protection_started")
            await trio.sleep(seconds)
            # Just after an ack, mid-epoch (were an ACK in flight, its epoch's lines
            # would be lost with the primary; none is ever printed twice).
            acks = len(primary.of("checkpoint_acked"))
            last_ack = (await primary.wait_for(
                lambda p: p.of("checkpoint_acked")[acks:], what="checkpoint_acked"))[-1]
            primary.kill()
            say(f"tremus demo: SIGKILL the primary (last acked checkpoint: {last_ack['epoch']})")
            complete = (await backup.wait_for(lambda b: b.of("failover_complete"),
                                              what="failover_complete"))[0]
            before = len(backup.of("console"))
            await backup.wait_for(lambda b: len(b.of("console")) >= before + 3,
                                  what="the guest's console on the backup")
            lines = [e["line"] for e in primary.events if e["event"] == "console"]
            resumed = [e["line"] for e in backup.events if e["event"] == "console"]
            say(f"tremus demo: the primary's guest last printed {lines[-1]!r}; on the backup it "
                f"went on with {resumed[0]!r} after {complete['downtime_ms']:.0f} ms "
                f"(checkpoint {complete['epoch']})")
            first, last = int(resumed[0].split()[1]), int(lines[-1].split()[1])
            if first == last + 1:
                say("tremus demo: no line printed twice, none lost (console lines wait for "
                    "their checkpoint's ack)")
            elif first > last + 1:
                # The backup had acked a checkpoint whose ack the primary never read.
                say(f"tremus demo: lines {last + 1}..{first - 1} were acked by the backup but "
                    f"never released by the primary: lost with it, none printed twice")
            # It continued from a checkpoint (not from 1), and repeated no line.
            ok = 1 < first and last < first
            verdict = VERDICT_OK if ok else VERDICT_FAILED
            summary = _summary(primary, backup, verdict, ok)  # the lines judged above
        except AssertionError as exc:
            # A step did not happen (a child exited, or a wait timed out): say which.
            detail = str(exc)
            verdict = "FAILED: " + detail.split(" (exit=")[0]
            sys.stderr.write(f"tremus demo: {detail}\n")
        finally:
            for child in (primary, backup):
                if child is not None:
                    child.kill()
            summary = summary or _summary(primary, backup, verdict, ok)
            nursery.cancel_scope.cancel()
    say("tremus demo: " + verdict)
    if as_json:
        out.write(json.dumps(summary) + "\n")
        out.flush()
    return 0 if ok else 1
