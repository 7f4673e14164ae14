"""Defects found by the fault campaign, each pinned by a test (issue: safe under every fault).

In one process where the fault needs precise timing (a stream that fails in both
directions at once), between real processes on loopback with SIGSTOP/SIGCONT/SIGKILL
otherwise, and in network namespaces for the nfqueue buffer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time

import pytest
import trio

from tests._microvm_util import needs_kvm
from tests.test_failover import counters, start_pair
from tremus import transports
from tremus.buffers.blockremus import fifo_paths
from tremus.domains.registry import create_domain
from tremus.engine.backup import BackupOutcome, BackupSession
from tremus.engine.config import ProtectionConfig
from tremus.engine.events import CheckpointAcked, FailoverComplete
from tremus.engine.primary import PrimarySession
from tremus.testing.etcd import EtcdCluster, require_etcd
from tremus.testing.procs import TremusProcess
from tremus.testing.topology import require_root

pytestmark = needs_kvm


class FailingBothWays(trio.abc.Stream):
    """The backup's end of a connection to a primary that dies while the backup's
    heartbeats are stuck: once ``stall()`` is called sends hang, and ``die()`` makes
    the hanging send and the pending receive fail together (a reset and a broken
    pipe, as two tasks see them). A test double for the network, not under test."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.stalled = False
        self.sending = trio.Event()
        self.dead = trio.Event()

    def stall(self) -> None:
        self.stalled = True

    def die(self) -> None:
        self.dead.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stalled:
            self.sending.set()
            await self.dead.wait()
            raise trio.BrokenResourceError("[Errno 32] Broken pipe")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.stalled:
            await self.dead.wait()
            raise trio.BrokenResourceError("[Errno 104] Connection reset by peer")
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def receive() -> None:
                got.append(await self.inner.receive_some(max_bytes))
                nursery.cancel_scope.cancel()

            async def die() -> None:
                await self.dead.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(receive)
            nursery.start_soon(die)
        if not got:
            raise trio.BrokenResourceError("[Errno 104] Connection reset by peer")
        return got[0]

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_two_tasks_seeing_the_dead_primary_at_once_still_fail_over() -> None:
    config = ProtectionConfig(interval_ms=20, heartbeat_ms=5, heartbeat_timeout_ms=1000)
    listener = await transports.listen("tcp://127.0.0.1:0")
    outcome: list[BackupOutcome] = []  # filled once the failed-over guest stops
    async with trio.open_nursery() as nursery:
        domain = create_domain("microvm:workload=counter,memory=4M,interval_ms=20")
        await nursery.start(domain.run)
        stream = await transports.connect(listener.url)
        wrapped = FailingBothWays(await listener.accept())
        await listener.aclose()
        backup = BackupSession(wrapped, config=config)
        primary = PrimarySession(domain, stream, config=config)
        acked: list[CheckpointAcked] = []
        primary.events.add_callback(
            lambda e: acked.append(e) if isinstance(e, CheckpointAcked) else None)

        async def run_backup() -> None:
            outcome.append(await backup.run())

        nursery.start_soon(run_backup)
        await nursery.start(primary.run)
        with trio.fail_after(30):
            while len(acked) < 3:
                await trio.sleep(0.01)
            wrapped.stall()
            await wrapped.sending.wait()  # a heartbeat hangs in send_all
            primary.stop()  # the primary's side goes away; ours fails both ways at once
            wrapped.die()
            complete = await backup.failover.wait()
        assert isinstance(complete, FailoverComplete)
        assert backup.domain is not None  # the guest runs here now
        nursery.cancel_scope.cancel()


async def test_a_stalled_backup_does_not_take_over_when_it_comes_back() -> None:
    async with trio.open_nursery() as nursery:
        backup, primary = await start_pair(nursery, "--heartbeat-timeout", "500",
                                           "--fence", "true", "--fence-timeout", "1")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        backup.process.send_signal(signal.SIGSTOP)
        try:
            lost = await primary.wait_for(lambda p: p.of("backup_lost"), timeout=20,
                                          what="backup_lost")
            # Held for the backup's takeover window: its timeout, fence time, a grace.
            assert lost[0]["hold_ms"] == 500 + 1000 + 250
            await trio.sleep(2.5)
        finally:
            backup.process.send_signal(signal.SIGCONT)
        await backup.exited.wait()
        assert not backup.of("failover_started"), backup.events[-3:]
        assert not backup.of("failover_complete")
        # The primary was never fenced: its guest runs on.
        at = len(primary.events)
        await primary.wait_for(lambda p: len(counters(p.events[at:])) >= 3, what="counter")
        assert primary.process.returncode is None
        primary.kill()


async def test_a_backup_past_its_takeover_window_refuses_even_without_an_end() -> None:
    """The primary gave the backup up while it was stopped and then died, so no END
    and an EOF wait for the backup: the replica is stale, it must not run."""
    async with trio.open_nursery() as nursery:
        backup, primary = await start_pair(nursery, "--heartbeat-timeout", "300")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        backup.process.send_signal(signal.SIGSTOP)
        try:
            # (Not output_released: the console device releases output at every ack.)
            await primary.wait_for(lambda p: p.of("backup_lost"), timeout=20,
                                   what="backup_lost")
            await trio.sleep(1.5)  # past the window: the primary may have gone on
            primary.kill()
            await primary.exited.wait()
        finally:
            backup.process.send_signal(signal.SIGCONT)
        await backup.exited.wait()
        assert not backup.of("failover_complete"), backup.events[-3:]


async def _halted_as_a_zombie(primary: TremusProcess) -> None:
    """The primary, back from a stall the backup took for its death, stopped its guest
    and exited 1 saying so."""
    await primary.exited.wait()
    assert primary.process.returncode == 1
    halted = primary.of("ownership_lost")
    assert halted and "stood still" in halted[0]["reason"], primary.events[-3:]


async def test_a_stalled_primary_stops_its_guest_when_it_comes_back() -> None:
    """No fence: the backup takes over from a primary that stood still; the primary,
    back, must not answer anyone (split brain) — it stops its guest."""
    async with trio.open_nursery() as nursery:
        backup, primary = await start_pair(nursery, "--heartbeat-timeout", "500")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        primary.process.send_signal(signal.SIGSTOP)
        try:
            complete = await backup.wait_for(lambda b: b.of("failover_complete"),
                                             what="failover")
        finally:
            primary.process.send_signal(signal.SIGCONT)
        await _halted_as_a_zombie(primary)
        # Nothing of an epoch the backup does not hold got out of the zombie.
        late = [e for e in primary.of("output_released") if e["epoch"] > complete[0]["epoch"]]
        assert not late, late
        backup.kill()


async def _late_ack_pair(nursery: trio.Nursery) -> tuple[TremusProcess, TremusProcess]:
    """A backup that sends every ACK 300 ms late (timeout 1 s on both sides) and a
    primary protecting a counter guest to it every 200 ms, three ACKs in."""
    from tests._procs import free_port
    from tremus.testing.procs import start_tremus

    port = free_port()
    backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                "--json", "--once", "--heartbeat-timeout", "1000",
                                env={"TREMUS_INJECT_ACK_DELAY_MS": "300"})
    await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
    primary = await start_tremus(
        nursery, "primary", "protect", "--domain",
        "microvm:workload=counter,memory=16M,interval_ms=20", "--backup",
        f"127.0.0.1:{port}", "--interval", "200", "--heartbeat-timeout", "1000", "--json")
    await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 3, what="acks")
    return backup, primary


async def test_an_ack_read_after_a_stall_releases_nothing_once_the_backup_took_over() -> None:
    """The ACK of checkpoint N reaches a primary that stands still (here: the backup
    sends it 300 ms late, and the primary is stopped meanwhile); the backup then takes
    over. The primary, back, must not release N's output on that ACK (its guest's
    output would leave two hosts): it holds it until the backup shows it still serves
    it, which it never does, and stops its guest."""
    async with trio.open_nursery() as nursery:
        backup, primary = await _late_ack_pair(nursery)

        def unacked_sent(p: TremusProcess) -> int | None:
            acked = {e["epoch"] for e in p.of("checkpoint_acked")}
            sent = [e["epoch"] for e in p.of("checkpoint_sent") if e["epoch"] not in acked]
            return sent[-1] if sent else None

        epoch = await primary.wait_for(unacked_sent, what="a checkpoint sent, not acked yet")
        primary.process.send_signal(signal.SIGSTOP)
        try:
            await backup.wait_for(lambda b: b.of("failover_complete"), what="failover")
            applied = {e["epoch"] for e in backup.of("checkpoint_applied")}
            assert epoch in applied, (epoch, sorted(applied)[-3:])  # its ACK was sent
        finally:
            primary.process.send_signal(signal.SIGCONT)
        await _halted_as_a_zombie(primary)
        late = [e for e in primary.events if e.get("epoch", -1) >= epoch
                and e["event"] in ("checkpoint_acked", "output_released")]
        assert not late, late
        backup.kill()


async def test_an_ack_held_after_a_short_stall_is_released_once_the_backup_answers() -> None:
    """The same late ACK after a stall too short for a takeover (600 ms of the
    backup's 1000): the backup echoes the primary's next heartbeat, so the held ACK
    commits its epoch (its output goes out) and protection simply goes on."""
    async with trio.open_nursery() as nursery:
        backup, primary = await _late_ack_pair(nursery)
        sent = len(primary.of("checkpoint_sent"))
        await primary.wait_for(lambda p: len(p.of("checkpoint_sent")) > sent, what="a send")
        epoch = primary.of("checkpoint_sent")[-1]["epoch"]
        primary.process.send_signal(signal.SIGSTOP)
        await trio.sleep(0.6)
        primary.process.send_signal(signal.SIGCONT)
        await primary.wait_for(
            lambda p: any(e["epoch"] >= epoch + 5 for e in p.of("checkpoint_acked")),
            what="five more acks")
        released = {e["epoch"] for e in primary.of("output_released")}
        assert epoch in released
        assert not primary.of("backup_lost") and not backup.of("failover_started")
        assert primary.process.returncode is None
        primary.kill()
        backup.kill()


async def test_failover_complete_when_the_backup_was_stopped_as_the_primary_died() -> None:
    """Stall, then kill (the campaign's defect 1): the backup fails over, it does not crash."""
    async with trio.open_nursery() as nursery:
        backup, primary = await start_pair(nursery, "--heartbeat-timeout", "1000")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 10, what="acks")
        primary.process.send_signal(signal.SIGSTOP)
        await trio.sleep(0.3)
        backup.process.send_signal(signal.SIGSTOP)
        primary.kill()
        await trio.sleep(0.5)
        backup.process.send_signal(signal.SIGCONT)
        await backup.wait_for(lambda b: b.of("failover_complete"), what="failover")
        assert b"Traceback" not in backup.stderr
        assert backup.process.returncode is None
        backup.kill()


_no_netns = require_root() or (None if shutil.which("iptables") else "needs iptables")


@pytest.mark.skipif(_no_netns is not None, reason=_no_netns or "")
async def test_nfqueue_protection_ends_cleanly_and_survives_the_backup() -> None:
    from tests._netharness import kv_net

    with trio.fail_after(60):
        async with kv_net() as net:
            await net.start_backup()
            primary = await net.start_primary("nfqueue", 50, "--duration", "3")
            await primary.exited.wait()
            assert primary.process.returncode == 0, primary.stderr.decode()[-2000:]
            assert b"Traceback" not in primary.stderr
            assert primary.of("protection_stopped") and primary.of("domain_stopped")

            backup = await net.start_backup()
            primary = await net.start_primary("nfqueue", 50)
            backup.kill()
            await primary.wait_for(lambda p: p.of("backup_lost"), what="backup_lost")
            got = await net.ask("SET after backup-lost", timeout=30)
            assert got.reply == "OK after"
            assert primary.process.returncode is None


_no_etcd = require_etcd()


async def arbitrated_pair(nursery: trio.Nursery, cluster: EtcdCluster
                          ) -> tuple[TremusProcess, TremusProcess]:
    """A backup and a primary deciding ownership in ``cluster`` (1 s leases), 5 acks in."""
    arbiter = ("--arbiter", cluster.url, "--lease-ttl", "1")
    backup, primary = await start_pair(nursery, "--heartbeat-timeout", "500", *arbiter,
                                       primary_args=arbiter)
    await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
    return backup, primary


@pytest.mark.skipif(_no_etcd is not None, reason=_no_etcd or "")
async def test_with_an_arbiter_the_backup_takes_over_only_after_the_lease_expires() -> None:
    async with EtcdCluster(3) as cluster, trio.open_nursery() as nursery:
        backup, primary = await arbitrated_pair(nursery, cluster)
        taken = primary.of("ownership_taken")
        assert taken and taken[0]["owner"].startswith(socket.gethostname())
        primary.kill()
        killed_at = time.time()
        complete = await backup.wait_for(lambda b: b.of("failover_complete"),
                                         what="failover")
        owner = backup.of("ownership_taken")
        assert owner and owner[0]["time"] <= complete[0]["time"]
        # The primary's lease (at least 1 s from its last renewal) had to expire first.
        assert owner[0]["time"] - killed_at > 0.3
        at = len(backup.events)
        await backup.wait_for(lambda b: len(counters(b.events[at:])) >= 2, what="counter")
        backup.kill()


@pytest.mark.skipif(_no_etcd is not None, reason=_no_etcd or "")
async def test_with_an_arbiter_a_stale_backup_is_refused_ownership() -> None:
    async with EtcdCluster(3) as cluster, trio.open_nursery() as nursery:
        backup, primary = await arbitrated_pair(nursery, cluster)
        backup.process.send_signal(signal.SIGSTOP)
        try:
            lost = await primary.wait_for(lambda p: p.of("backup_lost"), what="backup_lost")
            assert lost[0]["hold_ms"] == 0  # the arbiter, not a timer, decides
            at = len(primary.events)
            await primary.wait_for(lambda p: len(counters(p.events[at:])) >= 3,
                                   what="the guest going on")
        finally:
            backup.process.send_signal(signal.SIGCONT)
        await backup.exited.wait()
        assert not backup.of("failover_complete")
        assert primary.process.returncode is None
        primary.kill()


@pytest.mark.parametrize("answer", ["fail", "garbage"])
async def test_an_external_disk_that_fails_stops_protection_loudly(tmp_path, answer) -> None:
    """``--disk-fifo``: a block-remus-compatible disk (a test double of the external
    peer) answers ``done`` a few times, then ``fail`` or garbage: ``device_failed``,
    END to the backup (no failover), and the guest runs on."""
    control, msg = fifo_paths(tmp_path, "backup", 9)
    os.mkfifo(control)
    os.mkfifo(msg)
    flushes = 0

    # The peer holds both fifos open (read-write: no EOF before the engine comes).
    requests = trio.lowlevel.FdStream(os.open(control, os.O_RDWR | os.O_NONBLOCK))
    answers = trio.lowlevel.FdStream(os.open(msg, os.O_RDWR | os.O_NONBLOCK))

    async def peer() -> None:
        nonlocal flushes
        async with requests, answers:
            pending = b""
            while True:
                pending += await requests.receive_some(5)
                while len(pending) >= 5:
                    assert pending[:5] == b"flush", pending
                    pending = pending[5:]
                    flushes += 1
                    if flushes <= 5:
                        await answers.send_all(b"done")
                    else:
                        await answers.send_all(b"fail" if answer == "fail" else b"dOne")
                        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        backup, primary = await start_pair(nursery, primary_args=("--disk-fifo", control))
        failed = await primary.wait_for(lambda p: p.of("device_failed"), what="device_failed")
        assert failed[0]["device"] == "blockremus"
        assert len(primary.of("checkpoint_acked")) >= 5
        await backup.exited.wait()
        assert not backup.of("failover_started")
        at = len(primary.events)
        await primary.wait_for(lambda p: len(counters(p.events[at:])) >= 3, what="guest runs on")
        assert primary.process.returncode is None
        primary.kill()
        nursery.cancel_scope.cancel()
