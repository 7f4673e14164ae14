"""``tremus demo``: protect a counter micro-VM, kill the primary, watch the backup take over.

Runs a real backup and a real primary as two OS processes on loopback, lets them
checkpoint for a while, SIGKILLs the primary, and shows the guest's counter going on
on the backup from its last acknowledged checkpoint. The guest's console lines are
held until their checkpoint is acknowledged, like its network output, so the backup
prints the next line and none twice.

With ``--json`` every event of both processes is one JSON line (``who``: ``primary``
or ``backup``), and the last line is the ``demo_summary``: the verdict and the
figures it rests on.

SIGTERM or SIGINT stops it gracefully, as it does every ``tremus`` command: the
primary ends protection (END, no failover), the backup stops, and the verdict is
``INTERRUPTED: stopped by SIGTERM`` (exit 0); a second signal exits at once.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
from typing import Any, Protocol, TextIO

import trio

from tremus.testing.procs import TremusProcess, start_tremus

__all__ = ["StopRequest", "run_demo"]


_COUNTER = re.compile(r"^counter (\d+)$")

#: The verdict when the counter went on on the backup (the human mode's last line).
VERDICT_OK = "OK"
VERDICT_FAILED = "FAILED: the counter did not continue"
#: The verdict's start when a signal stopped the demo (``INTERRUPTED: stopped by SIGINT``).
VERDICT_INTERRUPTED = "INTERRUPTED"

#: How long an interrupted demo's child may take to stop gracefully before SIGKILL.
STOP_TIMEOUT = 30.0
#: How long the last events of children that exited may take to be read.
_DRAIN_TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counters(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := _COUNTER.match(line))]


def _summary(primary: TremusProcess | None, backup: TremusProcess | None,
             verdict: str, ok: bool) -> dict[str, Any]:
    """The ``demo_summary`` event: the verdict, and the figures it rests on, from what
    the two processes printed (None: not started, e.g. when interrupted at once)."""
    printed = ([e["line"] for e in primary.events if e["event"] == "console"]
               if primary is not None else [])
    resumed = ([e["line"] for e in backup.events if e["event"] == "console"]
               if backup is not None else [])
    acked = primary.of("checkpoint_acked") if primary is not None else []
    complete = backup.of("failover_complete") if backup is not None else []
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
        "checkpoints_applied": len(backup.of("checkpoint_applied")) if backup is not None else 0,
    }


class StopRequest(Protocol):
    """What asks the demo to stop early: the ``tremus`` command's signal handling."""

    @property
    def event(self) -> trio.Event:
        """Set when the demo is to stop."""
        ...

    @property
    def reason(self) -> str:
        """Why, e.g. ``stopped by SIGTERM``."""
        ...


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (the demo's scenario) once ``event`` (a stop request) is set."""
    await event.wait()
    scope.cancel()


async def _stop_gracefully(child: TremusProcess) -> bool:
    """SIGTERM ``child`` (a ``tremus`` command: it stops gracefully, see cli._Stop) and
    wait for it to exit; SIGKILL it if it has not within ``STOP_TIMEOUT``. False then."""
    if child.process.returncode is None:
        child.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT):
        await child.exited.wait()
        return True
    child.kill()
    sys.stderr.write(f"tremus demo: the {child.name} did not stop within {STOP_TIMEOUT:g} s "
                     f"of SIGTERM: killed\n")
    return False


async def run_demo(seconds: float, as_json: bool, out: TextIO = sys.stdout,
                   stop: StopRequest | None = None) -> int:
    """Returns 0 when the counter continued on the backup from the last acked checkpoint,
    repeating no line the primary printed. With ``as_json`` the last line written is
    the ``demo_summary`` event.

    When ``stop`` is set first, the demo stops gracefully instead: its primary ends
    protection (END: the backup does not fail over), then its backup stops; the
    verdict is ``INTERRUPTED: <reason>`` and the status 0 (1 if a child had to be
    killed). Its children have sessions of their own, so a terminal's Ctrl-C reaches
    only the demo, which tells them in this order (a SIGINT to the whole group would
    stop the backup beside a primary still protecting, and the demo's SIGTERM that
    follows would be a second signal to them: an exit without END)."""

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
                      "failover_complete", "primary_connected", "protection_stopped",
                      "replica_closed", "domain_stopped"):
            detail = {k: v for k, v in event.items() if k not in ("event", "time")}
            say(f"  [{who:7}] {name} {detail}")

    port = _free_port()
    spec = "microvm:workload=counter,memory=16M,interval_ms=200"
    say(f"tremus demo: a counter micro-VM protected over tcp://127.0.0.1:{port}")
    ok = False
    verdict = VERDICT_FAILED
    summary: dict[str, Any] = {}
    interrupted = False
    stopped_cleanly = True
    primary: TremusProcess | None = None
    backup: TremusProcess | None = None
    async with trio.open_nursery() as nursery:
        try:
            with trio.CancelScope() as scenario:
                if stop is not None:
                    nursery.start_soon(_cancel_when, stop.event, scenario)
                try:
                    backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                                f"127.0.0.1:{port}", "--json", own_session=True)
                    backup.on_event(show)
                    await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
                    primary = await start_tremus(nursery, "primary", "protect", "--domain", spec,
                                                 "--backup", f"127.0.0.1:{port}", "--interval",
                                                 "50", "--json", own_session=True)
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
                    say(f"tremus demo: SIGKILL the primary (last acked checkpoint: "
                        f"{last_ack['epoch']})")
                    complete = (await backup.wait_for(lambda b: b.of("failover_complete"),
                                                      what="failover_complete"))[0]
                    before = len(backup.of("console"))
                    await backup.wait_for(lambda b: len(b.of("console")) >= before + 3,
                                          what="the guest's console on the backup")
                    lines = [e["line"] for e in primary.events if e["event"] == "console"]
                    resumed = [e["line"] for e in backup.events if e["event"] == "console"]
                    say(f"tremus demo: the primary's guest last printed {lines[-1]!r}; on the "
                        f"backup it went on with {resumed[0]!r} after "
                        f"{complete['downtime_ms']:.0f} ms (checkpoint {complete['epoch']})")
                    first, last = int(resumed[0].split()[1]), int(lines[-1].split()[1])
                    if first == last + 1:
                        say("tremus demo: no line printed twice, none lost (console lines wait "
                            "for their checkpoint's ack)")
                    elif first > last + 1:
                        # The backup had acked a checkpoint whose ack the primary never read.
                        say(f"tremus demo: lines {last + 1}..{first - 1} were acked by the "
                            f"backup but never released by the primary: lost with it, none "
                            f"printed twice")
                    # It continued from a checkpoint (not from 1), and repeated no line.
                    ok = 1 < first and last < first
                    verdict = VERDICT_OK if ok else VERDICT_FAILED
                    summary = _summary(primary, backup, verdict, ok)  # the lines judged above
                except AssertionError as exc:
                    # A step did not happen (a child exited, or a wait timed out): say which.
                    detail = str(exc)
                    verdict = "FAILED: " + detail.split(" (exit=")[0]
                    sys.stderr.write(f"tremus demo: {detail}\n")
            if stop is not None and scenario.cancelled_caught:
                interrupted, ok = True, False
                verdict = f"{VERDICT_INTERRUPTED}: {stop.reason}"
                protecting = primary is not None and primary.process.returncode is None
                say(f"tremus demo: {stop.reason}: " + (
                    "the primary ends protection (END: the backup does not fail over), then "
                    "the backup stops" if protecting else "the backup stops"))
                # The primary first: a backup stopped first would end its protection,
                # and the primary would go on unprotected until told.
                for child in (primary, backup):
                    if child is not None:
                        stopped_cleanly = await _stop_gracefully(child) and stopped_cleanly
        finally:
            for child in (primary, backup):
                if child is not None:
                    child.kill()
        if interrupted:
            # Both exited: their pumps end at EOF, having read the last events (which
            # the summary counts); the deadline only bounds a pipe held open elsewhere.
            nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_TIMEOUT
        else:
            summary = summary or _summary(primary, backup, verdict, ok)
            nursery.cancel_scope.cancel()
    if interrupted:
        summary = _summary(primary, backup, verdict, ok)
    say("tremus demo: " + verdict)
    if as_json:
        out.write(json.dumps(summary) + "\n")
        out.flush()
    if interrupted:
        return 0 if stopped_cleanly else 1
    return 0 if ok else 1
