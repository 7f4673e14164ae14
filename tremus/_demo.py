"""``tremus demo``: protect a counter micro-VM, kill the primary, watch the backup take over.

Runs a real backup and a real primary as two OS processes on loopback, lets them
checkpoint for a while, SIGKILLs the primary, and shows the guest's counter going on
on the backup from its last acknowledged checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any, TextIO

import trio

__all__ = ["run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Child:
    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.changed = trio.Event()
        self.stderr = b""

    async def pump(self, show: Any) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    event = json.loads(line)
                    self.events.append(event)
                    show(self.name, event)
            self.changed.set()
            self.changed = trio.Event()

    async def pump_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    async def wait_for(self, name: str, count: int = 1, timeout: float = 60) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                found = [e for e in self.events if e["event"] == name]
                if len(found) >= count:
                    return found[count - 1]
                if self.process.returncode is not None:
                    raise RuntimeError(
                        f"the {self.name} exited ({self.process.returncode}): "
                        f"{self.stderr.decode(errors='replace').strip()[-500:]}")
                await self.changed.wait()


async def _start(nursery: trio.Nursery, name: str, args: list[str], show: Any) -> _Child:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tremus.cli", *args, "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    child = _Child(name, process)
    nursery.start_soon(child.pump, show)
    nursery.start_soon(child.pump_stderr)
    return child


async def run_demo(seconds: float, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Returns 0 when the counter continued on the backup from the last acked checkpoint."""

    def say(text: str) -> None:
        if not as_json:
            out.write(text + "\n")
            out.flush()

    def show(who: str, event: dict[str, Any]) -> None:
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
    async with trio.open_nursery() as nursery:
        backup = await _start(nursery, "backup", ["backup", "--listen", f"127.0.0.1:{port}"], show)
        primary: _Child | None = None
        try:
            await backup.wait_for("backup_ready")
            primary = await _start(nursery, "primary", [
                "protect", "--domain", spec, "--backup", f"127.0.0.1:{port}", "--interval", "50",
            ], show)
            await primary.wait_for("protection_started")
            await trio.sleep(seconds)
            last_ack = [e for e in primary.events if e["event"] == "checkpoint_acked"][-1]
            say(f"tremus demo: SIGKILL the primary (last acked checkpoint: {last_ack['epoch']})")
            primary.process.send_signal(signal.SIGKILL)
            complete = await backup.wait_for("failover_complete")
            before = len([e for e in backup.events if e["event"] == "console"])
            await backup.wait_for("console", before + 3)
            lines = [e["line"] for e in primary.events if e["event"] == "console"]
            resumed = [e["line"] for e in backup.events if e["event"] == "console"]
            say(f"tremus demo: the primary's guest last printed {lines[-1]!r}; on the backup it "
                f"went on with {resumed[0]!r} after {complete['downtime_ms']:.0f} ms "
                f"(checkpoint {complete['epoch']})")
            first, last = int(resumed[0].split()[1]), int(lines[-1].split()[1])
            # It continued from a checkpoint (not from 1), and from no later than the primary.
            ok = 1 < first <= last + 1
        finally:
            for child in (primary, backup):
                if child is not None and child.process.returncode is None:
                    child.process.send_signal(signal.SIGKILL)
            nursery.cancel_scope.cancel()
    say("tremus demo: " + ("OK" if ok else "FAILED: the counter did not continue"))
    return 0 if ok else 1
