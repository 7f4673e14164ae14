"""Failover with a client talking: every acknowledged write survives, nothing changes for it.

Three hosts in namespaces (``tests/_netharness.py``). The client (the test process, in
the client namespace) keeps writing ``SET key<i> value<i>``, each retried until an
``OK`` comes, to the guest's one address. The primary is SIGKILLed mid-stream (its
whole process group); the backup notices (the dead process's connection closes),
rebuilds the guest from the last checkpoint it applied, attaches it to the TAP on
its own host and announces it (gratuitous ARP, seen by the client host), and the
client - unchanged, same address and port - gets its ``OK``s from there. Every key
whose ``SET`` was acknowledged, before or after the kill, then reads back its value:
an ``OK`` leaves the primary only once the backup holds the state that produced it.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable

import pytest
import trio

from tests._microvm_util import needs_kvm
from tests._netharness import GUEST_MAC, TAP, KvNet, kv_net
from tremus.testing.topology import require_root

_why_not = require_root() or (None if shutil.which("iptables") else "needs iptables")
pytestmark = [needs_kvm, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

INTERVAL_MS = 50
TRY_TIMEOUT = 0.5
HEARTBEAT_TIMEOUT_MS = 1000
ETH_P_ARP = 0x0806


class Writer:
    """SETs key0, key1, ... one at a time, each retried until its OK arrives."""

    def __init__(self, net: KvNet) -> None:
        self.net = net
        self.acked: dict[str, str] = {}
        self.ok_times: list[float] = []
        self.retries = 0
        self.stop = trio.Event()
        self._progress = trio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key, value = f"key{i}", f"value{i}-{i * 7919 % 1000}"
            while not self.stop.is_set():
                got = await self.net.try_ask(f"SET {key} {value}", timeout=TRY_TIMEOUT)
                if got is not None:
                    assert got.reply == f"OK {key}", got
                    self.acked[key] = value
                    self.ok_times.append(got.t1)
                    self._progress.set()
                    self._progress = trio.Event()
                    break
                self.retries += 1
            i += 1

    def oks_after(self, t: float) -> int:
        return sum(1 for ok in self.ok_times if ok > t)

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        with trio.move_on_after(timeout):
            while not predicate():
                await self._progress.wait()
            return
        raise AssertionError(f"client: no {what} after {timeout} s "
                             f"({len(self.acked)} OKs, {self.retries} retries)")


def gratuitous_arps(raw: socket.socket, ip: str) -> list[bytes]:
    """ARP frames waiting on ``raw`` that announce ``ip`` at ``GUEST_MAC``."""
    mac, addr = bytes.fromhex(GUEST_MAC.replace(":", "")), socket.inet_aton(ip)
    found = []
    while True:
        try:
            frame = raw.recv(2048)
        except BlockingIOError:
            return found
        if (frame[12:14] == b"\x08\x06" and frame[6:12] == mac and frame[22:28] == mac
                and frame[28:32] == addr and frame[38:42] == addr):
            found.append(frame)


@pytest.mark.parametrize("netbuf", ["vmm", "nfqueue"])
async def test_clients_keep_their_writes_across_failover(netbuf: str) -> None:
    with trio.fail_after(120):
        async with kv_net() as net:
            topo = net.topo
            backup = await net.start_backup("--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_MS))
            primary = await net.start_primary(netbuf, INTERVAL_MS)
            assert "NO-CARRIER" in topo.run("backup", ["ip", "link", "show", TAP]).stdout
            with topo.socket("client", socket.AF_PACKET, socket.SOCK_RAW,
                             socket.htons(ETH_P_ARP)) as arp:
                arp.bind(("eth0", 0))
                arp.setblocking(False)
                writer = Writer(net)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer.run)
                    await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 20,
                                           what="20 acked checkpoints")
                    await writer.wait(lambda: len(writer.acked) >= 5, "OKs from the primary")
                    gratuitous_arps(arp, net.guest_ip)  # forget what came before

                    primary.kill()
                    await primary.exited.wait()
                    killed_at = time.time()
                    acked_before = dict(writer.acked)
                    last_acked = primary.of("checkpoint_acked")[-1]["epoch"]

                    complete = await backup.wait_for(lambda b: b.of("failover_complete"),
                                                     timeout=20, what="failover_complete")
                    assert complete[0]["epoch"] >= last_acked
                    assert complete[0]["time"] - killed_at < HEARTBEAT_TIMEOUT_MS / 1000 + 5
                    # The guest is on the backup's TAP now, and said so to the segment.
                    await trio.to_thread.run_sync(topo.wait_forwarding, "backup", TAP)
                    # The client changed nothing: the same address answers, from the backup.
                    failed_over_at = complete[0]["time"]
                    await writer.wait(lambda: writer.oks_after(failed_over_at) >= 10,
                                      "OKs from the backup")
                    writer.stop.set()
                # Announced again and again over its first seconds (a stale MAC entry
                # pointing at the old host cannot hide it for long).
                announced = gratuitous_arps(arp, net.guest_ip)
                with trio.move_on_after(10):
                    while len(announced) < 5:
                        await trio.sleep(0.1)
                        announced += gratuitous_arps(arp, net.guest_ip)
                assert len(announced) >= 5, f"{len(announced)} gratuitous ARPs for the guest"

            await net.drain()
            assert len(writer.acked) > len(acked_before) >= 5
            for key, value in writer.acked.items():
                got = await net.ask(f"GET {key}")
                assert got.reply == f"VAL {key} {value}", (key, got.reply)
            assert not backup.of("failover_refused")
            assert backup.process.returncode is None  # still serving the guest
