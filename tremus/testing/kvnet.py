"""A protected kv guest on a namespace topology, driven from the calling process.

Layout (one :class:`~tremus.testing.topology.Topology`, no route out)::

    client 10.77.0.10         primary 10.77.0.11          backup 10.77.0.12
      UDP socket (caller)       br0: eth0 + tg0             br0: eth0 + tg0
                                `tremus protect` (kv VM)    `tremus backup`

More hosts may be added (e.g. ``etcd1..3`` for an arbiter); only the hosts a guest
may run on (``guest_hosts``, by default every host but the client) get the TAP.
The guest has the same IP and MAC on both hosts (``guest_address(0)`` and a fixed
locally administered MAC); the ``tremus`` processes run inside their host's
namespace with ``ip netns exec``, each in its own session (process group), so that
:meth:`NsProcess.kill` kills the real Python process whatever wraps it (and each
exits by itself if the calling process dies without killing it). The client
socket lives in the client namespace and is used from the calling Trio thread, so
``time.time()`` on replies is the same clock as the ``time`` of the processes'
JSON events.

Used by the end-to-end tests (through ``tests/_netharness.py``), the fault-injection
campaign (:mod:`tremus.testing.faults`) and ``bench/latency.py``.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tremus._groups import collapse_groups
from tremus.testing.procs import TremusProcess, start_tremus, tremus_argv
from tremus.testing.topology import Topology, cleanup_stale

__all__ = [
    "BACKUP_PORT", "GUEST_MAC", "KV_PORT", "REPO", "TAP", "Exchange", "KvNet", "NsProcess",
    "kv_net", "kv_ready", "run_in", "start_in",
]

#: The directory holding the ``tremus`` package (put on the children's PYTHONPATH).
REPO = Path(__file__).resolve().parent.parent.parent
KV_PORT = 7000
GUEST_MAC = "02:77:aa:00:00:01"
BACKUP_PORT = 7400
TAP = "tg0"


NsProcess = TremusProcess


async def start_in(nursery: trio.Nursery, topo: Topology, host: str, name: str,
                   *args: str) -> NsProcess:
    """Start ``tremus ARGS`` inside ``host`` in a new session; collect its events."""
    return await start_tremus(nursery, name, *args, wrapper=["ip", "netns", "exec", topo.netns(host)],
                              own_session=True, env={"PYTHONPATH": str(REPO)})


async def run_in(topo: Topology, host: str, *args: str, timeout: float = 60
                 ) -> subprocess.CompletedProcess[bytes]:
    """Run ``tremus ARGS`` inside ``host`` to completion (output captured)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            ["ip", "netns", "exec", topo.netns(host), *tremus_argv(args)],
            stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )


@dataclass
class Exchange:
    """One request and its reply, timed on the wall clock (``time.time()``)."""

    request: str
    reply: str
    t0: float
    t1: float

    @property
    def rtt_ms(self) -> float:
        return (self.t1 - self.t0) * 1000


@dataclass
class KvNet:
    """The topology and the client's socket to the guest."""

    topo: Topology
    sock: trio.socket.SocketType
    guest_ip: str
    nursery: trio.Nursery
    procs: list[NsProcess] = field(default_factory=list)
    backup_port: int = BACKUP_PORT
    _ports: itertools.count[int] = field(default_factory=lambda: itertools.count(BACKUP_PORT))

    @property
    def guest(self) -> tuple[str, int]:
        return (self.guest_ip, KV_PORT)

    def domain_spec(self, **extra: str) -> str:
        options = {"workload": "kv", "memory": "4M", "tap": TAP, "bridge": "br0",
                   "ip": f"{self.guest_ip}/24", "mac": GUEST_MAC, **extra}
        return "microvm:" + ",".join(f"{k}={v}" for k, v in options.items())

    async def start(self, host: str, name: str, *args: str) -> NsProcess:
        proc = await start_in(self.nursery, self.topo, host, name, *args)
        self.procs.append(proc)
        return proc

    @property
    def backup_address(self) -> str:
        """Where the last backup started listens (``HOST:PORT``)."""
        return f"{self.topo.address('backup')}:{self.backup_port}"

    async def start_backup(self, *extra: str, once: bool = True) -> NsProcess:
        """``tremus backup`` on the backup host (a new port each time); waits until ready.

        ``once``: it serves one primary and exits (the fault campaign watches it exit).
        """
        self.backup_port = next(self._ports)
        backup = await self.start("backup", "backup", "backup", "--listen",
                                  self.backup_address, "--json",
                                  *(("--once",) if once else ()), *extra)
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        return backup

    async def start_primary(self, netbuf: str, interval_ms: float, *extra: str,
                            acks: int = 1) -> NsProcess:
        """``tremus protect`` of the kv guest; returns once ``acks`` checkpoints are acked."""
        primary = await self.start(
            "primary", "primary", "protect", "--domain", self.domain_spec(),
            "--backup", self.backup_address, "--interval", f"{interval_ms:g}",
            "--netbuf", netbuf, "--json", *extra)
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= acks,
                               what=f"{acks} acked checkpoint(s)")
        await primary.wait_for(kv_ready, what="kv ready")
        return primary

    async def start_unprotected(self) -> NsProcess:
        """``tremus run`` of the kv guest on the primary host."""
        vm = await self.start("primary", "run", "run", "--domain", self.domain_spec(), "--json")
        await vm.wait_for(kv_ready, what="kv ready")
        return vm

    async def stop_all(self) -> None:
        """SIGKILL every process started here (all at once: no failover in between)."""
        for proc in self.procs:
            proc.kill()
        with trio.move_on_after(10):
            for proc in self.procs:
                await proc.exited.wait()
        self.procs.clear()

    async def ask(self, request: str, *, timeout: float = 30) -> Exchange:
        """Send ``request`` once and wait for the reply to it (same key)."""
        got = await self.try_ask(request, timeout=timeout)
        if got is None:
            raise AssertionError(f"no reply to {request!r} within {timeout} s")
        return got

    async def try_ask(self, request: str, *, timeout: float) -> Exchange | None:
        """Send ``request`` once; the reply naming its key, or ``None`` after ``timeout``.

        Replies to earlier requests (late answers to retries) are skipped.
        """
        key = request.split()[1]
        t0 = time.time()
        await self.sock.sendto(request.encode(), self.guest)
        with trio.move_on_after(timeout):
            while True:
                data, addr = await self.sock.recvfrom(2048)
                t1 = time.time()
                reply = data.decode(errors="replace")
                parts = reply.split()
                if addr == self.guest and len(parts) >= 2 and parts[1] == key:
                    return Exchange(request, reply, t0, t1)
        return None

    async def drain(self) -> None:
        """Drop datagrams already waiting (late replies)."""
        while True:
            with trio.move_on_after(0):
                await self.sock.recv(2048)
                continue
            return


def kv_ready(proc: NsProcess) -> bool:
    """Whether ``proc``'s guest has said ``kv ready`` on its console."""
    return any(e.get("line", "").startswith("kv ready") for e in proc.of("console"))


def _quiet(topo: Topology, hosts: Sequence[str]) -> None:
    for host in hosts:
        for key in ("all", "default"):
            topo.run(host, ["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])


def _build(hosts: Sequence[str], guest_hosts: Sequence[str]) -> Topology:
    cleanup_stale()  # namespaces of processes that were killed
    topo = Topology(hosts).create()
    try:
        _quiet(topo, hosts)
        for host in guest_hosts:
            topo.add_tap(host, TAP)
    except BaseException:
        topo.close()
        raise
    return topo


@asynccontextmanager
async def kv_net(hosts: Sequence[str] = ("client", "primary", "backup"),
                 guest_hosts: Sequence[str] | None = None) -> AsyncIterator[KvNet]:
    """The topology, with TAP ``tg0`` on ``guest_hosts`` (default: every host but the
    client), and the client socket.

    Every process started through the returned :class:`KvNet` is killed, and every
    namespace deleted, on exit - also when the body fails.
    """
    if guest_hosts is None:
        guest_hosts = [host for host in hosts if host != "client"]
    topo = await trio.to_thread.run_sync(_build, hosts, guest_hosts)
    try:
        with topo.socket("client") as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock = trio.socket.from_stdlib_socket(raw)
            await sock.bind((topo.address("client"), 0))
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    net = KvNet(topo, sock, topo.guest_address(0), nursery)
                    try:
                        yield net
                    finally:
                        with trio.CancelScope(shield=True):
                            await net.stop_all()
                        nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(topo.close)
