"""SIGTERM and SIGINT stop every ``tremus`` command gracefully (the README's
**Signals.** paragraph): real processes, real signals.

Each command gets each signal once its guest is running (or its events flow), and
must exit 0 having done the graceful thing: ``run`` stops its guest, a primary ends
protection with END and its backup does not fail over, a backup ends the protection
it serves, ``demo`` stops both its processes and says it was interrupted, ``ctl``
ends quietly. A second signal during a graceful stop exits at once (128 + N).

Also: the options checked up front (``--reprotect-to``, ``--auth-secret-file``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests._microvm_util import needs_kvm
from tests._procs import TremusProcess, free_port, start_tremus

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
#: Both signals go through one handler (cli._Stop): run and protect are tried with
#: each, the other commands with one of them each, alternately (the suite's time).
SIGTERM_ONLY = [pytest.param(signal.SIGTERM, id="SIGTERM")]
SIGINT_ONLY = [pytest.param(signal.SIGINT, id="SIGINT")]
SPEC = "microvm:workload=counter,memory=16M,interval_ms=20"
#: Emulated guests are slow, more so on a loaded 2-core machine: waits are generous.
TIMEOUT = 60.0

Start = Callable[..., Awaitable[TremusProcess]]


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[Start]:
    """``start(name, *args)`` runs ``tremus ARGS``; whatever still runs at the end (a
    test that failed half-way) is SIGKILLed, so no guest outlives its test."""
    started: list[TremusProcess] = []
    async with trio.open_nursery() as nursery:

        async def start(name: str, *args: str) -> TremusProcess:
            child = await start_tremus(nursery, name, *args)
            started.append(child)
            return child

        try:
            yield start
        finally:
            for child in started:
                child.kill()


async def exit_status(child: TremusProcess, timeout: float = TIMEOUT) -> int:
    """``child``'s exit status, once it exited and every line it printed was read."""
    with trio.move_on_after(timeout):
        await child.exited.wait()
    if not child.exited.is_set():
        raise AssertionError(f"{child.name}: still running {timeout:g} s after the signal; "
                             f"last events={child.events[-5:]} "
                             f"stderr={child.stderr.decode(errors='replace')[-2000:]}")
    # Its last lines may still be in the pipe: the reader takes them (and then its EOF)
    # before every task here is blocked.
    with trio.move_on_after(10):
        await trio.testing.wait_all_tasks_blocked()
    status = child.process.returncode
    assert status is not None
    return status


def stderr_of(child: TremusProcess) -> str:
    return child.stderr.decode(errors="replace")


def by(child: TremusProcess, who: str, name: str) -> list[dict[str, Any]]:
    """The events of ``tremus demo``'s process ``who`` (its JSON lines are tagged)."""
    return [e for e in child.events if e.get("who") == who and e["event"] == name]


async def start_backup(start: Start, *args: str) -> tuple[TremusProcess, str]:
    address = f"127.0.0.1:{free_port()}"
    backup = await start("backup", "backup", "--listen", address, "--json", *args)
    await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
    return backup, address


async def start_protected(start: Start, *backup_args: str
                          ) -> tuple[TremusProcess, TremusProcess]:
    """A backup and a primary protecting a counter guest to it, a few checkpoints in."""
    backup, address = await start_backup(start, *backup_args)
    primary = await start("primary", "protect", "--domain", SPEC, "--backup", address,
                          "--interval", "20", "--json")
    await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 3,
                           timeout=TIMEOUT, what="3 acked checkpoints")
    return backup, primary


# -- the first signal: a graceful stop, exit 0 ----------------------------------------------


@needs_kvm
@pytest.mark.parametrize("signum", SIGNALS)
async def test_run_stops_its_guest(signum: signal.Signals) -> None:
    async with processes() as start:
        run = await start("run", "run", "--domain", SPEC, "--json")
        await run.wait_for(lambda r: r.of("console"), timeout=TIMEOUT, what="the guest's console")
        run.process.send_signal(signum)
        assert await exit_status(run) == 0, stderr_of(run)
        assert [e["reason"] for e in run.of("domain_stopped")] == [f"stopped by {signum.name}"]


@needs_kvm
@pytest.mark.parametrize("signum", SIGNALS)
async def test_protect_ends_protection_and_its_backup_does_not_fail_over(
        signum: signal.Signals) -> None:
    async with processes() as start:
        backup, primary = await start_protected(start, "--once")
        primary.process.send_signal(signum)
        assert await exit_status(primary) == 0, stderr_of(primary)
        reason = f"stopped by {signum.name}"
        assert [e["reason"] for e in primary.of("protection_stopped")] == [reason]
        assert [e["reason"] for e in primary.of("domain_stopped")] == [reason]
        assert not primary.of("backup_lost")  # it ended protection: it did not lose it
        # The backup (--once) was told END: it discards the replica, does not fail over.
        assert await exit_status(backup) == 0, stderr_of(backup)
        assert [e["outcome"] for e in backup.of("replica_closed")] == ["ended"]
        assert not backup.of("failover_started") and not backup.of("failover_refused")


@needs_kvm
@pytest.mark.parametrize("signum", SIGTERM_ONLY)
async def test_backup_ends_the_protection_it_serves(signum: signal.Signals) -> None:
    async with processes() as start:
        backup, primary = await start_protected(start)
        backup.process.send_signal(signum)
        # The primary is told (END): it goes on unprotected, holding nothing for a
        # takeover, and its guest's output flows.
        lost = await primary.wait_for(lambda p: p.of("backup_lost"), timeout=TIMEOUT,
                                      what="backup_lost")
        assert lost[0]["hold_ms"] == 0, lost
        assert f"stopped by {signum.name}" in lost[0]["reason"], lost
        assert await exit_status(backup) == 0, stderr_of(backup)
        assert [e["outcome"] for e in backup.of("replica_closed")] == ["ended"]
        assert not backup.of("failover_started") and not backup.of("failover_refused")
        lines = len(primary.of("console"))
        await primary.wait_for(lambda p: len(p.of("console")) >= lines + 3, timeout=TIMEOUT,
                               what="console lines after the backup ended protection")
        primary.process.send_signal(signal.SIGTERM)
        assert await exit_status(primary) == 0, stderr_of(primary)


@needs_kvm
@pytest.mark.parametrize("signum", SIGINT_ONLY)
async def test_backup_stops_the_guest_that_failed_over_to_it(signum: signal.Signals) -> None:
    async with processes() as start:
        backup, primary = await start_protected(start)
        primary.kill()
        await backup.wait_for(lambda b: b.of("failover_complete"), timeout=TIMEOUT,
                              what="failover_complete")
        lines = len(backup.of("console"))
        await backup.wait_for(lambda b: len(b.of("console")) >= lines + 2, timeout=TIMEOUT,
                              what="the guest's console on the backup")
        backup.process.send_signal(signum)
        assert await exit_status(backup) == 0, stderr_of(backup)
        assert [e["reason"] for e in backup.of("domain_stopped")] == [
            f"stopped by {signum.name}"]


@needs_kvm
@pytest.mark.parametrize("signum", SIGINT_ONLY)
async def test_demo_stops_both_processes_and_says_it_was_interrupted(
        signum: signal.Signals) -> None:
    async with processes() as start:
        demo = await start("demo", "demo", "--json", "--seconds", "600")
        await demo.wait_for(lambda d: len(by(d, "primary", "checkpoint_acked")) >= 3,
                            timeout=TIMEOUT, what="3 acked checkpoints")
        demo.process.send_signal(signum)
        assert await exit_status(demo) == 0, stderr_of(demo)
        summary = demo.events[-1]
        assert summary["event"] == "demo_summary", demo.events[-5:]
        assert summary["verdict"] == f"INTERRUPTED: stopped by {signum.name}", summary
        assert summary["ok"] is False and summary["checkpoints_acked"] >= 3, summary
        # It told its primary (SIGTERM, whatever it got), which ended protection, and
        # then its backup, which had failed nothing over.
        assert [e["reason"] for e in by(demo, "primary", "protection_stopped")] == [
            "stopped by SIGTERM"]
        assert [e["outcome"] for e in by(demo, "backup", "replica_closed")] == ["ended"]
        assert not by(demo, "backup", "failover_started")
        assert not stderr_of(demo).strip(), stderr_of(demo)


@needs_kvm
@pytest.mark.parametrize("signum", SIGTERM_ONLY)
async def test_ctl_events_ends_quietly(signum: signal.Signals, tmp_path: Path) -> None:
    control = str(tmp_path / "run.sock")
    async with processes() as start:
        run = await start("run", "run", "--domain", SPEC, "--control", control, "--json")
        await run.wait_for(lambda r: r.of("console"), timeout=TIMEOUT, what="the guest's console")
        ctl = await start("ctl", "ctl", control, "events", "--json")
        await ctl.wait_for(lambda c: len(c.of("console")) >= 2, timeout=TIMEOUT,
                           what="events streamed")
        ctl.process.send_signal(signum)
        assert await exit_status(ctl) == 0, stderr_of(ctl)
        assert stderr_of(ctl) == ""  # quietly: no traceback, no error
        # The server only lost a client.
        assert not run.exited.is_set()
        run.process.send_signal(signal.SIGTERM)
        assert await exit_status(run) == 0, stderr_of(run)


# -- the second signal: at once, 128 + N ----------------------------------------------------


def _children(pid: int) -> dict[int, bytes]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


@needs_kvm
async def test_a_second_signal_during_the_graceful_stop_exits_at_once() -> None:
    """``tremus demo``'s graceful stop waits for its backup to exit: with the backup
    SIGSTOPped, that stop is held (up to 30 s) and a second signal is sure to come
    during it. SIGINT first, SIGTERM second: 143, neither 0 nor KeyboardInterrupt's 130."""
    held: int | None = None
    try:
        async with processes() as start:
            demo = await start("demo", "demo", "--json", "--seconds", "600")
            await demo.wait_for(lambda d: len(by(d, "primary", "checkpoint_acked")) >= 3,
                                timeout=TIMEOUT, what="3 acked checkpoints")
            backups = [pid for pid, cmdline in _children(demo.process.pid).items()
                       if b"\0backup\0--listen\0" in cmdline]
            assert len(backups) == 1, _children(demo.process.pid)
            held = backups[0]
            os.kill(held, signal.SIGSTOP)
            demo.process.send_signal(signal.SIGINT)
            # The demo is stopping gracefully: its primary was told and stopped...
            await demo.wait_for(lambda d: by(d, "primary", "domain_stopped"), timeout=TIMEOUT,
                                what="the primary's graceful stop")
            # ... and the backup cannot: the demo waits for it. A second signal:
            demo.process.send_signal(signal.SIGTERM)
            assert await exit_status(demo, timeout=10) == 128 + signal.SIGTERM, stderr_of(demo)
            assert "SIGTERM again: exiting now" in stderr_of(demo)
            assert not demo.of("demo_summary")  # at once: the graceful end never came
    finally:
        if held is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(held, signal.SIGKILL)


# -- options checked before anything starts -------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``tremus ARGS``; an error found up front ends it long before the timeout (a
    command that started instead runs until killed: the test fails on the timeout)."""
    return subprocess.run([sys.executable, "-m", "tremus.cli", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("address", ["garbage", "127.0.0.1:port", "127.0.0.1:0",
                                     "127.0.0.1:65536", "blackhole://"])
def test_a_bad_reprotect_to_address_is_refused_up_front(address: str) -> None:
    proc = _cli("backup", "--listen", f"127.0.0.1:{free_port()}", "--reprotect-to", address)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"tremus: error: --reprotect-to {address}: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("command", [
    ["backup", "--listen", "127.0.0.1:0"],
    ["protect", "--domain", "microvm:memory=4M", "--backup", "127.0.0.1:1"],
], ids=["backup", "protect"])
def test_a_missing_or_unreadable_auth_secret_file_is_named(command: list[str],
                                                           tmp_path: Path) -> None:
    missing = str(tmp_path / "nonexistent")
    proc = _cli(*command, "--auth-secret-file", missing)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"tremus: error: --auth-secret-file {missing}: no such file"
    # A directory cannot be read as a file (unlike a mode-000 file, when run as root).
    proc = _cli(*command, "--auth-secret-file", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        f"tremus: error: --auth-secret-file {tmp_path}: cannot read it: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
