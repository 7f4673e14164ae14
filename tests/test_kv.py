"""The micro-VM's NIC and the ``kv`` workload, on real KVM, a real TAP, a real netns.

Every test gets its own network namespace holding a persistent TAP ``tkv0`` with the
host side 10.99.0.1/24 and nothing else (no route out; IPv6 off so the host stays
quiet). The test's main thread enters that namespace for the test's duration, so
the micro-VM opens ``tkv0`` there and the test's client sockets talk to the guest
(10.99.0.2) from the TAP's host side. The restore test runs the restored VM in a
child process started with ``ip netns exec``, as a backup host would.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from tests._microvm_util import ConsoleLog, boot, needs_kvm
from tremus.buffers.vmm import VmmNetBuffer
from tremus.domains.base import DomainError
from tremus.domains.microvm import MicroVM, MicroVMConfig, abi
from tremus.domains.microvm.nic import default_mac
from tremus.domains.microvm.tap import Tap
from tremus.domains.registry import create_domain
from tremus.engine.devices import CheckpointDevice

REPO = Path(__file__).resolve().parent.parent
TAP = "tkv0"
HOST_IP = "10.99.0.1"
GUEST_IP = "10.99.0.2"
GUEST = (GUEST_IP, abi.KV_UDP_PORT)
KV_OPTIONS = {"workload": "kv", "memory": "4M", "tap": TAP, "ip": f"{GUEST_IP}/24"}

_why_not = (
    "needs root" if os.geteuid() != 0
    else "needs the ip command" if shutil.which("ip") is None
    else "needs /dev/net/tun" if not os.path.exists("/dev/net/tun")
    else None
)
needs_netns = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")
_names = itertools.count()
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _entered(ns: str) -> Iterator[None]:
    """The calling thread (here: the test's main thread) inside netns ``ns``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


@dataclass
class Net:
    ns: str

    def ip(self, *args: str) -> str:
        return _ip("-n", self.ns, *args)

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def _remove_stale_netns() -> None:
    """Namespaces left by test processes that were killed (``tkv<pid>x<n>``)."""
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(r"tkv(\d+)x\d+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def net() -> Iterator[Net]:
    """A fresh netns with TAP ``tkv0`` (10.99.0.1/24, up), entered by this thread."""
    if _why_not is not None:
        pytest.skip(_why_not)
    _remove_stale_netns()
    ns = f"tkv{os.getpid()}x{next(_names)}"
    _ip("netns", "add", ns)
    try:
        n = Net(ns)
        for key in ("all", "default"):
            subprocess.run(n.exec_argv("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"),
                           check=True, timeout=30)
        n.ip("link", "set", "lo", "up")
        n.ip("tuntap", "add", "dev", TAP, "mode", "tap")
        n.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        n.ip("link", "set", TAP, "up")
        with _entered(ns):
            yield n
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _udp() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


async def ask(sock: trio.socket.SocketType, request: str | bytes) -> str:
    await sock.sendto(request.encode() if isinstance(request, str) else request, GUEST)
    return await reply(sock)


async def reply(sock: trio.socket.SocketType) -> str:
    with trio.fail_after(30):
        data, addr = await sock.recvfrom(2048)
    assert addr == GUEST
    return data.decode()


async def nothing_pending(sock: trio.socket.SocketType) -> bool:
    """True if no datagram is waiting (the check itself takes a few ms)."""
    with trio.move_on_after(0.02):
        data = await sock.recv(2048)
        raise AssertionError(f"a frame got out while held: {data!r}")
    return True


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


@contextlib.asynccontextmanager
async def running_kv(log: ConsoleLog | None = None, **extra: str) -> AsyncIterator[MicroVM]:
    log = log if log is not None else ConsoleLog()
    vm = boot(log, **{**KV_OPTIONS, **extra})
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.run)
            await log.wait_until(lambda c: any(line.startswith("kv ready") for line in c.lines),
                                 timeout=30)
            yield vm
            vm.stop()
    finally:
        vm.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _packet_socket() -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((TAP, 0))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(sock.recv(65536))
        except BlockingIOError:
            return frames


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("microvm:workload=kv", "workload=kv needs a NIC and an address"),
        ("microvm:workload=kv,tap=t0", "workload=kv needs a NIC and an address"),
        ("microvm:ip=10.0.0.2/24", "needs a NIC: give tap=NAME"),
        ("microvm:tap=t0,ip=10.0.0.2", "needs a prefix length"),
        ("microvm:tap=t0,ip=10.0.0.0/24", "network or broadcast"),
        ("microvm:tap=t0,ip=300.0.0.1/24", "not an IPv4 address"),
        ("microvm:tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("microvm:tap=t0,mac=02:00:00:00:00", "not a MAC address"),
        ("microvm:tap=a-name-longer-than-15", "not a valid interface name"),
        ("microvm:tap=t0,bridge=a/b", "not a valid interface name"),
    ],
)
def test_bad_network_options_give_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(DomainError, match=message):
        create_domain(spec)


def test_network_boot_info() -> None:
    config = MicroVMConfig.from_options(KV_OPTIONS)
    info = config.boot_info()
    assert info.ip == bytes([10, 99, 0, 2]) and info.netmask == bytes([255, 255, 255, 0])
    assert info.mac == default_mac(TAP) and info.mac[0] == 0x02  # local, unicast
    assert info.net_buf == abi.NET_BUF_ADDR
    given = MicroVMConfig.from_options({**KV_OPTIONS, "mac": "02:AA:bb:cc:dd:ee"})
    assert given.boot_info().mac == bytes.fromhex("02aabbccddee")
    assert MicroVMConfig.from_dict(config.to_dict()) == config
    assert MicroVMConfig().boot_info().net_buf == 0


def test_vmm_buffer_is_a_checkpoint_device() -> None:
    buf = VmmNetBuffer(SimpleNamespace(nic=None))  # type: ignore[arg-type]
    assert isinstance(buf, CheckpointDevice)
    assert buf.max_inflight > 1


async def test_vmm_buffer_needs_a_nic() -> None:
    buf = VmmNetBuffer(SimpleNamespace(nic=None))  # type: ignore[arg-type]
    with pytest.raises(DomainError, match="needs a micro-VM with a NIC"):
        await buf.setup()


# -- the TAP ------------------------------------------------------------------------------


@needs_netns
def test_tap_created_bridged_and_removed(net: Net) -> None:
    net.ip("link", "add", "br0", "type", "bridge")
    with Tap.open("tnew0", bridge="br0") as tap:
        assert tap.created
        link = net.ip("-d", "link", "show", "tnew0")
        assert "master br0" in link and ",UP" in link and "tun type tap" in link
    assert "tnew0" not in net.ip("link", "show")  # tremus created it: gone with the fd


@needs_netns
def test_existing_tap_is_attached_and_restored(net: Net) -> None:
    net.ip("link", "add", "br0", "type", "bridge")
    net.ip("link", "set", TAP, "down")
    with Tap.open(TAP, bridge="br0") as tap:
        assert not tap.created
        link = net.ip("link", "show", TAP)
        assert "master br0" in link and ",UP" in link
    link = net.ip("link", "show", TAP)  # still there, as we found it
    assert "master" not in link and ",UP" not in link


@needs_netns
def test_tap_errors_are_clear(net: Net) -> None:
    net.ip("link", "add", "br0", "type", "bridge")
    with pytest.raises(DomainError, match="bridge 'nobr' does not exist"):
        Tap.open(TAP, bridge="nobr")
    with pytest.raises(DomainError, match="'lo' is not a bridge"):
        Tap.open(TAP, bridge="lo")
    with pytest.raises(DomainError, match="exists and is not a TAP"):
        Tap.open("br0")
    with Tap.open(TAP, bridge="br0"), pytest.raises(DomainError, match="already in use"):
        Tap.open(TAP)
    # Already a port of this bridge (left by someone else): fine.
    net.ip("link", "set", TAP, "master", "br0")
    with Tap.open(TAP, bridge="br0") as tap:
        assert tap.bridge == "br0"
    assert "master br0" in net.ip("link", "show", TAP)


# -- the kv guest ------------------------------------------------------------------------


@needs_kvm
@needs_netns
async def test_arp_and_ping_are_answered(net: Net) -> None:
    log = ConsoleLog()
    async with running_kv(log) as vm:
        assert f"kv ready ip={GUEST_IP}" in log.lines
        ping = trio.socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with ping:
            payload = bytes(range(56))
            for seq in (1, 2):
                body = struct.pack("!BBHHH", 8, 0, 0, 0x7E57, seq) + payload
                body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
                await ping.sendto(body, (GUEST_IP, 0))
                with trio.fail_after(30):
                    while True:
                        data, (src, _) = await ping.recvfrom(4096)
                        icmp = data[(data[0] & 15) * 4:]
                        if src == GUEST_IP and icmp[0] == 0 and icmp[4:8] == body[4:8]:
                            break
                assert icmp[8:] == payload
                assert _checksum(icmp) == 0
                assert _checksum(data[: (data[0] & 15) * 4]) == 0  # IPv4 header checksum
        # The host learned the guest's MAC from the guest's ARP reply.
        neigh = net.ip("neigh", "show", GUEST_IP, "dev", TAP)
        assert default_mac(TAP).hex(":") in neigh, neigh
        assert vm.nic is not None and vm.nic.counters["rx_frames"] >= 3


@needs_kvm
@needs_netns
async def test_udp_set_get_none_err(net: Net) -> None:
    async with running_kv():
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            assert await ask(sock, "GET missing") == "NONE missing"
            assert await ask(sock, "SET colour blue") == "OK colour"
            assert await ask(sock, "GET colour") == "VAL colour blue"
            assert await ask(sock, "SET colour dark green\n") == "OK colour"
            assert await ask(sock, "GET colour\r\n") == "VAL colour dark green"
            k, v = "k" * 32, "v" * 64
            assert await ask(sock, f"SET {k} {v}") == f"OK {k}"
            assert await ask(sock, f"GET {k}") == f"VAL {k} {v}"
            bad: list[tuple[str | bytes, str]] = [
                ("DEL colour", "ERR unknown command"),
                ("", "ERR unknown command"),
                ("SET colour", "ERR usage: SET"),
                ("SET colour ", "ERR usage: SET"),
                ("GET", "ERR unknown command"),
                ("GET a b", "ERR usage: GET"),
                (f"SET {k}x 1", "ERR key too long"),
                (f"SET key {v}x", "ERR value too long"),
                (f"GET {k}x", "ERR key too long"),
                (b"SET key \x00\xff", "ERR bad character"),
            ]
            for request, error in bad:
                answer = await ask(sock, request)
                assert answer.startswith(error), (request, answer)
            # Many keys (the table probes past collisions).
            for i in range(40):
                assert await ask(sock, f"SET key{i} value{i}") == f"OK key{i}"
            for i in range(40):
                assert await ask(sock, f"GET key{i}") == f"VAL key{i} value{i}"
            assert await ask(sock, "GET colour") == "VAL colour dark green"


@needs_kvm
@needs_netns
async def test_values_persist_across_suspend_and_resume(net: Net) -> None:
    async with running_kv() as vm:
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            assert await ask(sock, "SET fruit apple") == "OK fruit"
            await vm.suspend()
            await sock.sendto(b"GET fruit", GUEST)  # waits in the TAP while suspended
            await trio.sleep(0.3)
            assert await nothing_pending(sock)
            await vm.resume()
            assert await reply(sock) == "VAL fruit apple"


@needs_kvm
@needs_netns
async def test_received_frames_dirty_the_rx_page(net: Net) -> None:
    async with running_kv() as vm:
        assert vm.nic is not None
        with _packet_socket() as raw:
            await vm.suspend()
            vm.read_and_clear_dirty()
            before = vm.nic.counters["rx_frames"]
            await vm.resume()
            # An ARP request for another address: the guest reads it and does not answer.
            arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x02\x00\x00\x00\x00\x09"
                   + socket.inet_aton(HOST_IP) + bytes(6) + socket.inet_aton("10.99.0.77"))
            raw.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x09" + b"\x08\x06" + arp)
            await wait_for(lambda: vm.nic is not None and vm.nic.counters["rx_frames"] > before,
                           "the guest received the frame")
            await vm.suspend()
            dirty = set(vm.read_and_clear_dirty())
            assert abi.NET_BUF_ADDR // abi.PAGE_SIZE in dirty
            await vm.resume()


@needs_kvm
@needs_netns
async def test_vmm_buffer_holds_replies_until_commit(net: Net) -> None:
    async with running_kv() as vm:
        # A permanent neighbour entry: the host's ARP must not depend on held replies.
        net.ip("neigh", "replace", GUEST_IP, "lladdr", default_mac(TAP).hex(":"), "dev", TAP,
               "nud", "permanent")
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            assert await ask(sock, "SET a 1") == "OK a"
            assert await ask(sock, "SET b 2") == "OK b"
            buf = VmmNetBuffer(vm)
            await buf.setup()
            # Epoch 1 produces the answer to GET a, epoch 2 the answer to GET b.
            await sock.sendto(b"GET a", GUEST)
            await wait_for(lambda: buf.held_frames == 1, "reply held")
            assert await nothing_pending(sock)
            await vm.suspend()
            await buf.postsuspend(1)
            await buf.preresume(1)
            await vm.resume()
            await sock.sendto(b"GET b", GUEST)
            await wait_for(lambda: buf.held_frames == 2, "reply held")
            await vm.suspend()
            await buf.postsuspend(2)
            await vm.resume()
            assert buf.held_epochs == [1, 2]
            assert await nothing_pending(sock)
            assert await buf.commit(1) == 1
            assert await reply(sock) == "VAL a 1"
            assert await nothing_pending(sock)  # epoch 2 is not committed
            assert await buf.commit(1) == 0
            assert await buf.commit(2) == 1
            assert await reply(sock) == "VAL b 2"
            # The open epoch (3) is released by release_all, then nothing is held.
            await sock.sendto(b"GET a", GUEST)
            await wait_for(lambda: buf.held_frames == 1, "reply held")
            assert await nothing_pending(sock)
            await buf.release_all()
            assert not buf.holding
            assert await reply(sock) == "VAL a 1"
            assert await ask(sock, "GET b") == "VAL b 2"
            assert buf.held_frames == 0 and buf.released == 3 and buf.dropped == 0
            await buf.teardown()
            assert vm.nic is not None and vm.nic.tx_hook is None


@needs_kvm
@needs_netns
async def test_vmm_buffer_teardown_drops_uncommitted(net: Net) -> None:
    async with running_kv() as vm:
        net.ip("neigh", "replace", GUEST_IP, "lladdr", default_mac(TAP).hex(":"), "dev", TAP,
               "nud", "permanent")
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            buf = VmmNetBuffer(vm)
            await buf.setup()
            await sock.sendto(b"GET x", GUEST)
            await wait_for(lambda: buf.held_frames == 1, "reply held")
            with pytest.raises(ValueError, match="closed after"):
                await buf.postsuspend(5)
                await buf.postsuspend(5)
            await buf.teardown()
            assert buf.dropped == 1 and await nothing_pending(sock)
            assert await ask(sock, "GET x") == "NONE x"  # not held any more


RESTORE_CHILD = textwrap.dedent(
    """
    import json, socket, sys, trio
    from tremus.domains.registry import restore_domain

    async def main(config_path, ram_path, state_path, *keys):
        config = json.load(open(config_path))
        ram = memoryview(bytearray(open(ram_path, "rb").read()))
        state = open(state_path, "rb").read()
        vm = restore_domain("microvm", config, ram, state)
        answers = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.run)
            announced = vm.announce()
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.bind(("10.99.0.1", 0))
            with trio.fail_after(60):
                for key in keys:
                    await sock.sendto(f"GET {key}".encode(), ("10.99.0.2", 7000))
                    answers[key] = (await sock.recv(2048)).decode()
                await sock.sendto(b"SET after restore", ("10.99.0.2", 7000))
                answers["after"] = (await sock.recv(2048)).decode()
            vm.stop()
        print(json.dumps({"answers": answers, "announced": announced,
                          "nic": vm.nic.counters}))

    trio.run(main, *sys.argv[1:])
    """
)


@needs_kvm
@needs_netns
async def test_table_survives_save_and_restore_in_another_process(
    net: Net, tmp_path: Path
) -> None:
    pairs = {f"key{i}": f"value number {i}" for i in range(12)}
    async with running_kv() as vm:
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            for key, value in pairs.items():
                assert await ask(sock, f"SET {key} {value}") == f"OK {key}"
        await vm.suspend()
        state = vm.save_state()
        (tmp_path / "ram").write_bytes(vm.ram)
        (tmp_path / "state").write_bytes(state)
        (tmp_path / "config.json").write_text(json.dumps(dict(vm.config)))
        counters = dict(vm.nic.counters) if vm.nic else {}
    # The primary is gone (its TAP fd closed); the "backup" opens the same TAP.
    with _packet_socket() as raw:
        _drain(raw)
        proc = await trio.run_process(
            net.exec_argv(sys.executable, "-c", RESTORE_CHILD, str(tmp_path / "config.json"),
                          str(tmp_path / "ram"), str(tmp_path / "state"), *pairs, "nokey"),
            capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 0, proc.stderr.decode()
        frames = _drain(raw)
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["answers"] == {**{k: f"VAL {k} {v}" for k, v in pairs.items()},
                              "nokey": "NONE nokey", "after": "OK after"}
    # The NIC's counters continued from the checkpoint.
    assert out["nic"]["tx_frames"] >= counters["tx_frames"] + len(pairs) + 2
    # The restored VM announced itself: a gratuitous ARP for its IP, from its MAC.
    mac, ip = default_mac(TAP), socket.inet_aton(GUEST_IP)
    assert out["announced"] is True
    garps = [f for f in frames if f[12:14] == b"\x08\x06" and f[6:12] == mac
             and f[20:22] == b"\x00\x01" and f[22:28] == mac and f[28:32] == ip
             and f[38:42] == ip and f[:6] == b"\xff" * 6]
    assert garps, [f[:42].hex() for f in frames]
