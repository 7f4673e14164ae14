"""``tremus backup`` is a service: it serves many primaries and survives bad clients.

Real processes on loopback: one backup, started once, sees a plain connect-and-close,
4 KiB of random bytes, a HELLO with the wrong secret, a failed TLS handshake, two
primaries protected at the same time, a third with a name it already holds, and a
third after the first two ended - and is still up and serving at the end. Each bad
client is exactly one ``connection_rejected`` event (or, without --json, one line)
naming the address of its socket and what it did wrong; a silent TLS client is one
after the handshake timeout. A primary the backup cannot host (its --memory-limit,
the host's available memory) is told why. A guest that failed over to a backup is
protected to a third one, unprotected and stopped through the backup's control socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests._microvm_util import needs_kvm
from tests._procs import (
    TremusProcess,
    free_port,
    local_address,
    plain_lines,
    run_ctl,
    scripted_hello,
    start_tremus,
)
from tremus._service import HANDSHAKE_TIMEOUT_ENV
from tremus.engine import protocol as p
from tremus.testing.procs import tremus_argv

pytestmark = needs_kvm


def _spec(name: str) -> str:
    return f"microvm:name={name},workload=counter,memory=4M,interval_ms=50"


async def _protect(nursery: trio.Nursery, name: str, port: int, *extra: str,
                   scheme: str = "") -> TremusProcess:
    return await start_tremus(nursery, f"primary-{name}", "protect", "--domain", _spec(name),
                              "--backup", f"{scheme}127.0.0.1:{port}", "--interval", "20",
                              "--json", *extra)


async def _raw(port: int, data: bytes) -> str:
    """Connect, send ``data``, close; our address (as the backup names its peer)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    address = local_address(stream)
    if data:
        await stream.send_all(data)
    await stream.aclose()
    return address


def _garbage() -> bytes:
    """4 KiB of random bytes (seeded: their first four, read as a frame's header length,
    are far above its 64 KiB cap, so the very first frame is an error)."""
    data = random.Random(4096).randbytes(4096)
    assert int.from_bytes(data[:4], "little") > 65536
    return data


def _hello(name: str, ram_size: int = 4 << 20) -> p.Hello:
    return p.Hello(driver="microvm", ram_size=ram_size,
                   config={"name": name, "workload": "counter", "memory": ram_size})


#: What the backup says of each bad client (one reason each, telling them apart).
_CLOSED = "closed the connection before sending HELLO"
_BAD_FRAME = "protocol error from the primary: frame header length"
_WRONG_SECRET = "authentication failed: wrong token"


async def _stderr(proc: TremusProcess) -> str:
    """What the process said on stderr (read to the end: it has exited)."""
    with trio.move_on_after(5):
        while not proc.stderr:
            await trio.sleep(0.05)
    return proc.stderr.decode(errors="replace")


async def _the_rejection(backup: TremusProcess, seen: int, peer: str, reason: str
                         ) -> dict[str, Any]:
    """The one event a bad client caused: after the ``seen`` events before it, exactly
    one ``connection_rejected`` naming ``peer`` and ``reason``."""
    await backup.wait_for(lambda b: len(b.events) > seen, what=f"the rejection of {peer}")
    new = backup.events[seen:]
    assert [e["event"] for e in new] == ["connection_rejected"], new
    assert new[0]["peer"] == peer, (new[0], peer)
    assert reason in str(new[0]["reason"]), (new[0], reason)
    return new[0]


def _rejections(backup: TremusProcess) -> list[dict[str, object]]:
    return backup.of("connection_rejected")


async def test_one_backup_serves_bad_clients_then_several_primaries(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"the right secret\n")
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"a wrong secret\n")
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--json", "--auth-secret-file", str(secret),
                                    "--state-dir", str(tmp_path / "state"))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")

        # Each bad client is one connection_rejected event, naming it (the address of
        # its socket) and what it did wrong, and nothing else.
        # 1. A plain connect-and-close (a health check).
        closed = await _raw(port, b"")
        await _the_rejection(backup, 1, closed, _CLOSED)
        # 2. 4 KiB of random bytes.
        garbage = await _raw(port, _garbage())
        await _the_rejection(backup, 2, garbage, _BAD_FRAME)
        # 3. A HELLO with the wrong secret (a scripted primary: we know its address), told
        # why with an END.
        liar, answer = await scripted_hello(port, _hello("liar"), secret=b"a wrong secret")
        assert isinstance(answer, p.End) and _WRONG_SECRET in answer.reason, answer
        await _the_rejection(backup, 3, liar, _WRONG_SECRET)
        # 4. The same from a real primary: it says so, and exits.
        real_liar = await _protect(nursery, "liar", port, "--auth-secret-file", str(wrong))
        await real_liar.exited.wait()
        assert real_liar.process.returncode == 2  # refused, as the twin below
        said = await _stderr(real_liar)
        assert _WRONG_SECRET in said, said
        await backup.wait_for(lambda b: len(b.events) > 4, what="the real liar's rejection")
        fourth = backup.events[4]
        assert fourth["event"] == "connection_rejected" and _WRONG_SECRET in fourth["reason"]
        assert str(fourth["peer"]).startswith("127.0.0.1:")
        assert fourth["peer"] not in (closed, garbage, liar, f"127.0.0.1:{port}")
        # Nothing else, then or since, not even on stderr.
        assert [e["event"] for e in backup.events] == ["backup_ready"] + 4 * [
            "connection_rejected"], backup.events
        assert backup.stderr == b""

        # 5. Two primaries at once, each its own replica: it serves on.
        a = await _protect(nursery, "a", port, "--auth-secret-file", str(secret))
        b = await _protect(nursery, "b", port, "--auth-secret-file", str(secret))
        for primary in (a, b):
            await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 10, what="acks")
        opened = {e["guest"] for e in backup.of("replica_opened")}
        assert opened == {"a", "b"}
        applied = {e.get("guest") for e in backup.of("checkpoint_applied")}
        assert applied == {"a", "b"}

        # 6. A primary with a name the backup holds is refused, clearly; a and b go on.
        twin = await _protect(nursery, "a", port, "--auth-secret-file", str(secret))
        await twin.exited.wait()
        assert twin.process.returncode == 2
        assert "already holds a guest named 'a'" in (await _stderr(twin))
        acked = len(a.of("checkpoint_acked"))
        await a.wait_for(lambda p: len(p.of("checkpoint_acked")) >= acked + 5, what="a goes on")

        # 7. Both end gracefully: no failover, the replicas are closed.
        for primary in (a, b):
            primary.process.send_signal(signal.SIGTERM)
            await primary.exited.wait()
            assert primary.process.returncode == 0
        await backup.wait_for(lambda b: len(b.of("replica_closed")) >= 2, what="closed")
        assert {e["outcome"] for e in backup.of("replica_closed")} == {"ended"}
        assert not backup.of("failover_started")

        # 8. A third primary, after those ended: served, and then it fails over here.
        c = await _protect(nursery, "c", port, "--auth-secret-file", str(secret))
        await c.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="c acks")
        c.kill()
        done = await backup.wait_for(lambda b: b.of("failover_complete"), what="failover")
        assert done[0]["guest"] == "c"
        await backup.wait_for(lambda b: any(e.get("guest") == "c" for e in b.of("console")
                                            if e["time"] > done[0]["time"]),
                              what="c's guest runs on the backup")
        # 9. And it serves on beside the guest that runs here now.
        d = await _protect(nursery, "d", port, "--auth-secret-file", str(secret))
        await d.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="d acks")
        d.kill()
        await backup.wait_for(lambda b: len(b.of("failover_complete")) >= 2, what="d here")
        assert backup.process.returncode is None  # still up through all of it

        # SIGTERM: the guest running here stops, the service ends cleanly.
        backup.process.send_signal(signal.SIGTERM)
        await backup.exited.wait()
        assert backup.process.returncode == 0
        assert backup.of("domain_stopped")
        nursery.cancel_scope.cancel()


async def test_each_bad_client_is_one_plain_log_line_naming_it(tmp_path: Path) -> None:
    """Without --json: each bad client is one line for people, with its address and
    what it did wrong; and the backup serves on (a right HELLO is welcomed)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"the right secret\n")
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--auth-secret-file", str(secret),
                                    "--state-dir", str(tmp_path / "state"))
        await backup.wait_for(plain_lines, what="the ready line")
        assert plain_lines(backup)[0].endswith(f"backup ready, listening on tcp://127.0.0.1:{port}")
        closed = await _raw(port, b"")
        await _the_line(backup, 1, closed, _CLOSED)
        garbage = await _raw(port, _garbage())
        await _the_line(backup, 2, garbage, _BAD_FRAME)
        liar, answer = await scripted_hello(port, _hello("liar"), secret=b"a wrong secret")
        assert isinstance(answer, p.End), answer
        await _the_line(backup, 3, liar, _WRONG_SECRET)
        _, welcome = await scripted_hello(port, _hello("honest"), secret=b"the right secret")
        assert isinstance(welcome, p.Welcome), welcome
        assert len([line for line in plain_lines(backup) if "rejected" in line]) == 3
        assert backup.stderr == b""
        backup.process.send_signal(signal.SIGTERM)
        await backup.exited.wait()
        assert backup.process.returncode == 0
        nursery.cancel_scope.cancel()


async def _the_line(backup: TremusProcess, seen: int, peer: str, reason: str) -> None:
    """After the ``seen`` lines before it, exactly one line for this client:
    ``HH:MM:SS connection rejected from PEER: REASON``."""
    await backup.wait_for(lambda b: len(plain_lines(b)) > seen, what=f"the line for {peer}")
    new = plain_lines(backup)[seen:]
    assert len(new) == 1, new
    match = re.fullmatch(r"\d\d:\d\d:\d\d connection rejected from (\S+): (.+)", new[0])
    assert match is not None, new
    assert match[1] == peer, (new, peer)
    assert reason in match[2], (new, reason)


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A CA and the backup's certificate (for 127.0.0.1), signed by it."""
    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    backup_pem = tmp_path / "backup.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(backup_pem))
    return ca_pem, backup_pem


async def _tls_backup(nursery: trio.Nursery, port: int, *tls: str) -> TremusProcess:
    return await start_tremus(nursery, "backup", "backup", "--listen", f"tls://127.0.0.1:{port}",
                              "--json", *tls)


async def test_a_failed_tls_handshake_is_one_event_and_the_backup_serves_on(
        tmp_path: Path) -> None:
    ca_pem, backup_pem = _tls_files(tmp_path)
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                    f"tls://127.0.0.1:{port}", "--json",
                                    "--tls-cert", str(backup_pem))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        # Plain bytes where a TLS ClientHello belongs, and a connection that never speaks
        # (it must not hold up the next one).
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        http = await _raw(port, b"GET / HTTP/1.0\r\n\r\n")
        rejected = await _the_rejection(backup, 1, http, "TLS handshake failed")
        primary = await _protect(nursery, "t", port, "--tls-ca", str(ca_pem), scheme="tls://")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        assert _rejections(backup) == [rejected]  # the silent one is waited for (30 s)
        await silent.aclose()
        primary.process.send_signal(signal.SIGTERM)
        await primary.exited.wait()
        assert primary.process.returncode == 0
        backup.process.send_signal(signal.SIGTERM)
        await backup.exited.wait()
        assert backup.process.returncode == 0
        nursery.cancel_scope.cancel()


async def test_a_silent_tls_client_is_rejected_after_the_handshake_timeout(
        tmp_path: Path) -> None:
    """A client that connects and says nothing: one rejection, naming it, once the
    handshake timeout (here 3 s, --handshake-timeout) is up, not before; then a primary
    is served."""
    ca_pem, backup_pem = _tls_files(tmp_path)
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                    f"tls://127.0.0.1:{port}", "--json",
                                    "--tls-cert", str(backup_pem),
                                    "--handshake-timeout", "3")
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        connected = time.time()
        rejected = await _the_rejection(backup, 1, local_address(silent),
                                        "no TLS handshake within 3 s")
        assert float(rejected["time"]) - connected >= 3 - 0.2, rejected  # not before
        # The backup closed it: our end reads EOF (or a reset), not more waiting.
        with trio.fail_after(5):
            with contextlib.suppress(trio.BrokenResourceError):
                assert await silent.receive_some(1) == b""
        await silent.aclose()
        primary = await _protect(nursery, "t", port, "--tls-ca", str(ca_pem), scheme="tls://")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        assert _rejections(backup) == [rejected]
        assert [e["guest"] for e in backup.of("replica_opened")] == ["t"]
        primary.kill()
        backup.kill()
        nursery.cancel_scope.cancel()


def test_a_bad_handshake_timeout_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(tremus_argv(["backup", "--listen", f"127.0.0.1:{free_port()}",
                                         "--state-dir", str(tmp_path / "state")]),
                            capture_output=True, text=True, check=False, timeout=30,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, HANDSHAKE_TIMEOUT_ENV: "soon"})
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        f"tremus: error: {HANDSHAKE_TIMEOUT_ENV}='soon': expected a positive number of seconds"]


async def test_ctl_stops_and_restarts_protection_of_a_running_guest(tmp_path: Path) -> None:
    port = free_port()
    control = str(tmp_path / "primary.sock")
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--json", "--control", str(tmp_path / "backup.sock"))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        primary = await _protect(nursery, "g", port, "--control", control)
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")

        status = await _ctl(control, "status", "--json")
        assert status["protected"] is True and status["guest"] == "g"
        backup_status = await _ctl(str(tmp_path / "backup.sock"), "status", "--json")
        assert [g["guest"] for g in backup_status["guests"]] == ["g"]  # type: ignore[attr-defined]

        await _ctl(control, "stop-protection")
        await backup.wait_for(lambda b: b.of("replica_closed"), what="replica closed")
        assert backup.of("replica_closed")[0]["outcome"] == "ended"
        lines = len(primary.of("console"))
        await primary.wait_for(lambda p: len(p.of("console")) >= lines + 3,
                               what="the guest runs on, unprotected")
        assert (await _ctl(control, "status", "--json"))["protected"] is False

        await _ctl(control, "protect", "--backup", f"127.0.0.1:{port}")
        assert (await _ctl(control, "status", "--json"))["protected"] is True
        acked = len(primary.of("checkpoint_acked"))
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= acked + 5,
                               what="protected again")
        assert len(backup.of("replica_opened")) == 2
        assert not backup.of("failover_started")

        await _ctl(control, "stop")
        await primary.exited.wait()
        assert primary.process.returncode == 0
        assert not Path(control).exists()
        backup.kill()
        nursery.cancel_scope.cancel()


async def _ctl(path: str, *args: str) -> dict[str, object]:
    result = await trio.run_process(tremus_argv(["ctl", path, *args]), capture_stdout=True,
                                    capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (args, result.stderr.decode())
    if "--json" in args:
        return dict(json.loads(result.stdout.decode().strip().splitlines()[-1]))
    return {}


def test_ctl_without_a_server_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tremus.cli", "ctl",
                             str(tmp_path / "nothing.sock"), "status"],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("tremus: error: cannot reach the control socket")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_primary_the_backup_cannot_host_is_refused_with_the_reason(
        tmp_path: Path) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--json", "--memory-limit", "6M")
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        first = await _protect(nursery, "first", port)
        await first.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 3, what="acks")
        second = await _protect(nursery, "second", port)
        await second.exited.wait()
        assert second.process.returncode == 2
        said = await _stderr(second)
        assert "needs 4 MiB for its replica" in said and "--memory-limit 6 MiB" in said, said
        rejected = await backup.wait_for(lambda b: b.of("connection_rejected"), what="reject")
        assert "memory-limit" in str(rejected[0]["reason"])
        acked = len(first.of("checkpoint_acked"))
        await first.wait_for(lambda p: len(p.of("checkpoint_acked")) >= acked + 3, what="on")
        first.kill()
        backup.kill()
        nursery.cancel_scope.cancel()


def _meminfo(field: str) -> int:
    """A /proc/meminfo field, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/meminfo")


async def test_a_primary_larger_than_the_hosts_memory_is_refused_with_the_reason(
        tmp_path: Path) -> None:
    """The host's available memory bounds a replica (no --memory-limit here).

    A real primary cannot run a guest larger than this host (its RAM is allocated and
    populated up front, and a micro-VM has at most 4 GiB), so a scripted primary (the
    real ``PrimaryConnection``) declares one in its HELLO: twice the host's RAM and
    swap. That is above MemAvailable, and, were the check gone, more than the
    backup's mmap of the replica could get (an error, not the OOM killer).
    """
    ram = 2 * (_meminfo("MemTotal") + _meminfo("SwapTotal")) // 4096 * 4096
    if ram > p.DEFAULT_MAX_RAM_SIZE:
        pytest.skip("this host has more memory than a HELLO may declare")
    available = _meminfo("MemAvailable")
    assert ram > available
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--json", "--state-dir", str(tmp_path / "state"))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        peer, answer = await scripted_hello(port, _hello("big", ram))
        # The primary is told why, with an END.
        assert isinstance(answer, p.End), answer
        match = re.fullmatch(rf"cannot hold a replica here: the domain's {ram >> 20} MiB of RAM "
                             rf"do not fit in this host's (\d+) MiB of available memory",
                             answer.reason)
        assert match is not None, answer.reason
        assert int(match[1]) <= available >> 20, (match[1], available)  # what it can hold
        # One event on the backup, naming the peer and the reason.
        rejected = await _the_rejection(backup, 1, peer, match[0].split(": ", 1)[1])
        # It serves on, and did not keep the refused guest's name: a primary with it
        # is served.
        big = await _protect(nursery, "big", port)
        await big.wait_for(lambda b: len(b.of("checkpoint_acked")) >= 3, what="acks")
        assert [e["guest"] for e in backup.of("replica_opened")] == ["big"]
        assert _rejections(backup) == [rejected]
        big.kill()
        backup.kill()
        nursery.cancel_scope.cancel()


async def test_a_guest_that_failed_over_is_managed_through_the_backups_control_socket(
        tmp_path: Path) -> None:
    """Backup B (with --control) runs guest g after its primary A died; through B's
    control socket g is protected to a third backup C, that protection is stopped
    (C sees the primary end: no failover there), and g is stopped."""
    b_port, c_port = free_port(), free_port()
    c_address = f"127.0.0.1:{c_port}"
    control = str(tmp_path / "b.sock")
    async with trio.open_nursery() as nursery:
        b = await start_tremus(nursery, "backup-b", "backup", "--listen", f"127.0.0.1:{b_port}",
                               "--json", "--control", control,
                               "--state-dir", str(tmp_path / "b"))
        c = await start_tremus(nursery, "backup-c", "backup", "--listen", c_address,
                               "--json", "--state-dir", str(tmp_path / "c"))
        for backup in (b, c):
            await backup.wait_for(lambda x: x.of("backup_ready"), what="backup_ready")
        a = await _protect(nursery, "g", b_port)
        await a.wait_for(lambda x: len(x.of("checkpoint_acked")) >= 5, what="acks")
        a.kill()
        done = await b.wait_for(lambda x: x.of("failover_complete"), what="failover")
        assert done[0]["guest"] == "g"
        await _runs_on(b, "g", after=done[0]["time"])
        status = await _ctl_json(control, "status")
        assert [(g["guest"], g["state"]) for g in status["guests"]] == [("g", "running")]

        # protect: the reply, then the operation's completion; C holds g's replica.
        protect = await run_ctl(control, "protect", "--guest", "g", "--backup", c_address)
        assert protect.returncode == 0, protect
        assert protect.stdout.decode().splitlines() == [
            "operation: protect", "guest: g", f"backup: {c_address}", "protect: ok"], protect
        opened = await c.wait_for(lambda x: x.of("replica_opened"), what="g's replica on C")
        assert [e["guest"] for e in opened] == ["g"]
        await c.wait_for(lambda x: len(x.of("checkpoint_applied")) >= 3, what="C applies")
        status = await _ctl_json(control, "status")
        assert status["guests"][0]["protection"]["backup"] == c_address, status

        # Again: refused, with the reason; C still holds the one replica.
        again = await run_ctl(control, "protect", "--guest", "g", "--backup", c_address)
        assert again.returncode == 1, again
        assert again.stdout == b""
        said = again.stderr.decode().splitlines()
        assert len(said) == 1 and said[0].startswith("tremus: error: "), said
        assert f"guest 'g' is already protected to {c_address}" in said[0], said
        assert len(c.of("replica_opened")) == 1

        # stop-protection: C is told the primary ended (no failover there); g runs on.
        stop_protection = await run_ctl(control, "stop-protection", "--guest", "g")
        assert stop_protection.returncode == 0, stop_protection
        assert stop_protection.stdout.decode().splitlines() == ["guest: g", "stopped: true"]
        closed = await c.wait_for(lambda x: x.of("replica_closed"), what="C's replica closed")
        assert [(e["guest"], e["outcome"]) for e in closed] == [("g", "ended")]
        await _runs_on(b, "g", after=closed[0]["time"])
        assert not c.of("failover_started") and not c.of("failover_complete")
        status = await _ctl_json(control, "status")
        assert status["guests"][0]["protection"]["protected"] is False, status

        # stop: the guest stops; B holds no guest, and serves on.
        stop = await run_ctl(control, "stop", "--guest", "g")
        assert stop.returncode == 0, stop
        assert stop.stdout.decode().splitlines() == ["guest: g", "stopping: true"]
        stopped = await b.wait_for(lambda x: x.of("domain_stopped"), what="g stops")
        assert [e["guest"] for e in stopped] == ["g"]
        assert (await _ctl_json(control, "status"))["guests"] == []
        assert b.process.returncode is None and c.process.returncode is None
        assert not c.of("failover_started")
        for backup in (b, c):
            backup.process.send_signal(signal.SIGTERM)
            await backup.exited.wait()
            assert backup.process.returncode == 0, backup.stderr
        nursery.cancel_scope.cancel()


async def _runs_on(backup: TremusProcess, guest: str, after: float) -> None:
    """``guest``'s console goes on on ``backup`` after time ``after``."""
    await backup.wait_for(lambda b: len([e for e in b.of("console") if e.get("guest") == guest
                                         and e["time"] > after]) >= 2,
                          what=f"{guest}'s console after {after}")


async def _ctl_json(path: str, command: str) -> Any:
    result = await run_ctl(path, command, "--json")
    assert result.returncode == 0, result
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


async def test_ctl_on_a_backup_says_what_is_wrong_without_a_class_name(tmp_path: Path) -> None:
    port = free_port()
    control = str(tmp_path / "b.sock")
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--json", "--control", control,
                                    "--state-dir", str(tmp_path / "state"))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        said: dict[str, list[str]] = {}
        for args in (("protect", "--guest", "nosuch", "--backup", "127.0.0.1:1"),
                     ("stop-protection", "--guest", "nosuch"), ("stop", "--guest", "nosuch")):
            result = await run_ctl(control, *args)
            assert result.returncode == 1, result
            said[args[0]] = result.stderr.decode().splitlines()
        backup.kill()
        nursery.cancel_scope.cancel()
    assert said == {command: ["tremus: error: no guest 'nosuch' here (held: none)"]
                    for command in ("protect", "stop-protection", "stop")}, said


async def test_a_refused_mutual_tls_peer_is_told_why_on_both_sides(tmp_path: Path) -> None:
    ca_pem, backup_pem = _tls_files(tmp_path)
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await _tls_backup(nursery, port, "--tls-cert", str(backup_pem),
                                   "--tls-ca", str(ca_pem))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        # No client certificate, where the backup requires one (mutual TLS).
        stranger = await _protect(nursery, "s", port, "--tls-ca", str(ca_pem), scheme="tls://")
        await stranger.exited.wait()
        assert stranger.process.returncode != 0
        said = await _stderr(stranger)
        assert "certificate" in said.lower(), said
        rejected = await backup.wait_for(lambda b: b.of("connection_rejected"), what="reject")
        assert "TLS handshake failed" in str(rejected[0]["reason"])
        assert "certificate" in str(rejected[0]["reason"]).lower(), rejected
        backup.kill()
        nursery.cancel_scope.cancel()


async def test_ctl_on_tremus_run_reports_and_stops_the_guest(tmp_path: Path) -> None:
    control = str(tmp_path / "run.sock")
    async with trio.open_nursery() as nursery:
        run = await start_tremus(nursery, "run", "run", "--domain", _spec("r"), "--json",
                                 "--control", control)
        await run.wait_for(lambda p: p.of("console"), what="the guest runs")
        status = await _ctl(control, "status", "--json")
        assert status["role"] == "run" and status["guest"] == "r"
        assert status["protected"] is False and status["running"] is True
        await _ctl(control, "stop")  # replied to before the process goes
        await run.exited.wait()
        assert run.process.returncode == 0
        assert "control socket" in str(run.of("domain_stopped")[0]["reason"])
        nursery.cancel_scope.cancel()
