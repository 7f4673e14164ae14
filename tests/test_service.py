"""``tremus backup`` is a service: it serves many primaries and survives bad clients.

Real processes on loopback: one backup, started once, sees a plain connect-and-close,
4 KiB of random bytes, a HELLO with the wrong secret, a failed TLS handshake, two
primaries protected at the same time, a third with a name it already holds, and a
third after the first two ended - and is still up and serving at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
import trustme

from tests._microvm_util import needs_kvm
from tests._procs import TremusProcess, free_port, start_tremus
from tremus.testing.procs import tremus_argv

pytestmark = needs_kvm


def _spec(name: str) -> str:
    return f"microvm:name={name},workload=counter,memory=4M,interval_ms=50"


async def _protect(nursery: trio.Nursery, name: str, port: int, *extra: str,
                   scheme: str = "") -> TremusProcess:
    return await start_tremus(nursery, f"primary-{name}", "protect", "--domain", _spec(name),
                              "--backup", f"{scheme}127.0.0.1:{port}", "--interval", "20",
                              "--json", *extra)


async def _raw(port: int, data: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if data:
        await stream.send_all(data)
    await stream.aclose()


async def _stderr(proc: TremusProcess) -> str:
    """What the process said on stderr (read to the end: it has exited)."""
    with trio.move_on_after(5):
        while not proc.stderr:
            await trio.sleep(0.05)
    return proc.stderr.decode(errors="replace")


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

        # 1. A plain connect-and-close (a health check).
        await _raw(port, b"")
        await backup.wait_for(lambda b: len(_rejections(b)) >= 1, what="rejection 1")
        # 2. 4 KiB of random bytes.
        await _raw(port, os.urandom(4096))
        await backup.wait_for(lambda b: len(_rejections(b)) >= 2, what="rejection 2")
        # 3. A HELLO with the wrong secret: the primary is told, and says so.
        liar = await _protect(nursery, "liar", port, "--auth-secret-file", str(wrong))
        await liar.exited.wait()
        assert liar.process.returncode != 0
        assert "refused" in (await _stderr(liar)) or "auth" in (await _stderr(liar)).lower()
        await backup.wait_for(lambda b: len(_rejections(b)) >= 3, what="rejection 3")
        reasons = [str(r["reason"]) for r in _rejections(backup)]
        assert "closed the connection before sending HELLO" in reasons[0]
        assert all(str(r["peer"]).startswith("127.0.0.1:") for r in _rejections(backup))
        assert "secret" in reasons[2] or "auth" in reasons[2].lower(), reasons
        assert not backup.of("replica_opened") and not backup.of("failover_started")

        # 4. Two primaries at once, each its own replica.
        a = await _protect(nursery, "a", port, "--auth-secret-file", str(secret))
        b = await _protect(nursery, "b", port, "--auth-secret-file", str(secret))
        for primary in (a, b):
            await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 10, what="acks")
        opened = {e["guest"] for e in backup.of("replica_opened")}
        assert opened == {"a", "b"}
        applied = {e.get("guest") for e in backup.of("checkpoint_applied")}
        assert applied == {"a", "b"}

        # 5. A primary with a name the backup holds is refused, clearly; a and b go on.
        twin = await _protect(nursery, "a", port, "--auth-secret-file", str(secret))
        await twin.exited.wait()
        assert twin.process.returncode == 2
        assert "already holds a guest named 'a'" in (await _stderr(twin))
        acked = len(a.of("checkpoint_acked"))
        await a.wait_for(lambda p: len(p.of("checkpoint_acked")) >= acked + 5, what="a goes on")

        # 6. Both end gracefully: no failover, the replicas are closed.
        for primary in (a, b):
            primary.process.send_signal(signal.SIGTERM)
            await primary.exited.wait()
            assert primary.process.returncode == 0
        await backup.wait_for(lambda b: len(b.of("replica_closed")) >= 2, what="closed")
        assert {e["outcome"] for e in backup.of("replica_closed")} == {"ended"}
        assert not backup.of("failover_started")

        # 7. A third primary, after those ended: served, and then it fails over here.
        c = await _protect(nursery, "c", port, "--auth-secret-file", str(secret))
        await c.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="c acks")
        c.kill()
        done = await backup.wait_for(lambda b: b.of("failover_complete"), what="failover")
        assert done[0]["guest"] == "c"
        await backup.wait_for(lambda b: any(e.get("guest") == "c" for e in b.of("console")
                                            if e["time"] > done[0]["time"]),
                              what="c's guest runs on the backup")
        # 8. And it serves on beside the guest that runs here now.
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
    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    backup_pem = tmp_path / "backup.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(backup_pem))
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                    f"tls://127.0.0.1:{port}", "--json",
                                    "--tls-cert", str(backup_pem))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        # Plain bytes where a TLS ClientHello belongs, and a connection that never speaks
        # (it must not hold up the next one).
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        await _raw(port, b"GET / HTTP/1.0\r\n\r\n")
        rejected = await backup.wait_for(lambda b: b.of("connection_rejected"), what="reject")
        assert "TLS handshake failed" in str(rejected[0]["reason"])
        primary = await _protect(nursery, "t", port, "--tls-ca", str(ca_pem), scheme="tls://")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        await silent.aclose()
        primary.process.send_signal(signal.SIGTERM)
        await primary.exited.wait()
        assert primary.process.returncode == 0
        backup.process.send_signal(signal.SIGTERM)
        await backup.exited.wait()
        assert backup.process.returncode == 0
        nursery.cancel_scope.cancel()


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
