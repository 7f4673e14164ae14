"""Multi-host test networks out of network namespaces.

Design (one L2 segment, no way out)::

    <prefix>-seg netns                  host netns <prefix>-<host>
    +------------------------+          +-------------------------------------+
    | br0 (no address)       |          | eth0  10.77.0.(10+i)/24             |
    |  |- v0 <--veth-------------------->  (client: address on eth0)          |
    |  |- v1 <--veth--------------------> eth0 --+ br0 10.77.0.(10+i)/24      |
    |  `- v2 ...             |          | tap0 --+  (after add_tap: guests)   |
    +------------------------+          +-------------------------------------+

* Every host is a netns with loopback up and one uplink veth ``eth0`` whose peer
  (``v<i>``) is a port of the central bridge ``br0`` in the segment netns.
* Hosts get ``10.77.0.(10+i)/24`` and no default route: traffic can only reach the
  other hosts of the same topology. Each topology is its own segment, so parallel
  topologies may reuse the same addresses without clashing.
* A host where a guest runs gets, on the first :meth:`Topology.add_tap`, its own
  bridge ``br0`` holding ``eth0`` (its address moves to ``br0``) and the guest's
  persistent TAP. Frames a guest writes into its TAP are bridged inside that
  host's namespace - where ``br_netfilter`` and NFQUEUE rules apply - then out of
  ``eth0`` to the segment.
* Names are ``<prefix>-<host>`` with a prefix unique per process and topology
  (``trm<pid>x<n>``); nothing is created in the root namespace, so deleting the
  namespaces deletes every interface, bridge, TAP and iptables rule with them.
  :meth:`Topology.close` runs on ``with``/``async with`` exit, from an ``atexit``
  hook, and :func:`cleanup_stale` removes leftovers of dead processes.

Commands run inside a host with ``ip netns exec`` (:meth:`Topology.run`,
:meth:`Topology.popen`); sockets and TAP fds are opened in a thread that entered
the host's namespace (:meth:`Topology.socket`, :meth:`Topology.open_tap`).
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final, final

import trio

from tremus.buffers.netlink import call_in_netns

__all__ = [
    "DEFAULT_PREFIX",
    "Tap",
    "Topology",
    "cleanup_stale",
    "require_root",
    "udp_frame",
]

#: Every namespace a Topology creates starts with this.
DEFAULT_PREFIX: Final = "trm"
_SUBNET: Final = "10.77.0"
_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_counter = itertools.count()
_live: set[Topology] = set()  # strong: a forgotten Topology is still closed at exit


def require_root() -> str | None:
    """Why namespace tests cannot run here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, TAP devices)"
    for tool in ("ip",):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in _path()):
            return f"needs `{tool}` (iproute2)"
    return None


def _path() -> list[str]:
    return os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep) + [
        "/usr/sbin",
        "/sbin",
    ]


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(argv)}` failed: {result.stderr.strip()}")
    return result


def _netns_names() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, include_live: bool = False) -> list[str]:
    """Delete namespaces left behind by topologies of processes that are gone.

    Args:
        prefix: the base prefix the topologies were created with.
        include_live: also delete those of processes still running (and our own).

    Returns:
        The names of the deleted namespaces.
    """
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)x\d+-")
    deleted = []
    for name in _netns_names():
        m = pattern.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if not include_live and _alive(pid):
            continue
        if _ip("netns", "del", name, check=False).returncode == 0:
            deleted.append(name)
    return deleted


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mac(index: int, role: int) -> str:
    # Locally administered, unicast; distinct per host and role.
    return f"02:77:{role:02x}:00:{index // 256:02x}:{index % 256:02x}"


@final
class Tap:
    """An open TAP file descriptor (``IFF_TAP | IFF_NO_PI``): raw Ethernet frames."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def fileno(self) -> int:
        return self.fd

    def write(self, frame: bytes) -> int:
        """Inject one frame as if the guest had sent it."""
        return os.write(self.fd, frame)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@final
class Topology:
    """Hosts in network namespaces on one bridged segment (see the module docstring).

    Use ``with Topology() as topo:`` or ``async with Topology() as topo:`` (the
    latter does the blocking ``ip`` calls in a worker thread).
    """

    def __init__(
        self, hosts: Sequence[str] = ("client", "primary", "backup"), *, prefix: str | None = None
    ) -> None:
        """Describe the topology; :meth:`create` (or entering it) builds it.

        Args:
            hosts: host names (letters, digits, ``-``; at most 200 hosts).
            prefix: namespace name prefix; default unique per process and instance.
        """
        if len(set(hosts)) != len(hosts) or not hosts or len(hosts) > 200:
            raise ValueError("host names must be unique, 1 to 200 of them")
        for host in hosts:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", host):
                raise ValueError(f"bad host name {host!r}")
        self.hosts: tuple[str, ...] = tuple(hosts)
        self.prefix = prefix or f"{DEFAULT_PREFIX}{os.getpid()}x{next(_counter)}"
        self.segment = f"{self.prefix}-seg"
        self._bridged: set[str] = set()
        self._taps: dict[tuple[str, str], None] = {}
        self._created: list[str] = []
        self._closed = False

    # -- names and addresses -----------------------------------------------------------

    def netns(self, host: str) -> str:
        """The namespace name of ``host`` (for ``ip netns exec`` and ``netns=``)."""
        self._index(host)
        return f"{self.prefix}-{host}"

    def _index(self, host: str) -> int:
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError(f"no host {host!r} in this topology") from None

    def address(self, host: str) -> str:
        """The host's IPv4 address (``10.77.0.(10+i)``)."""
        return f"{_SUBNET}.{10 + self._index(host)}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{_SUBNET}.0/24")

    def guest_address(self, n: int = 0) -> str:
        """An address on the segment no host uses, for a guest (``10.77.0.(100+n)``)."""
        if not 0 <= n < 100:
            raise ValueError("guest number out of range")
        return f"{_SUBNET}.{100 + n}"

    def l3_interface(self, host: str) -> str:
        """Where the host's address lives: ``br0`` once it has TAPs, else ``eth0``."""
        return "br0" if host in self._bridged else "eth0"

    def mac(self, host: str) -> bytes:
        """The MAC address frames to ``host``'s IP address must carry."""
        role = 2 if host in self._bridged else 1
        return bytes.fromhex(_mac(self._index(host), role).replace(":", ""))

    # -- building ----------------------------------------------------------------------

    def create(self) -> Topology:
        """Build the namespaces, bridge and links; on failure remove what was built."""
        if self._created:
            raise RuntimeError("topology already created")
        _live.add(self)
        try:
            self._add_netns(self.segment)
            self._batch(
                self.segment,
                ["link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"],
            )
            for i, host in enumerate(self.hosts):
                ns = self.netns(host)
                self._add_netns(ns)
                _ip(
                    "-n",
                    self.segment,
                    "link",
                    "add",
                    f"v{i}",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                self._batch(self.segment, [f"link set v{i} master br0", f"link set v{i} up"])
                self._batch(
                    ns,
                    [
                        "link set lo up",
                        f"link set eth0 address {_mac(i, 1)}",
                        f"addr add {self.address(host)}/24 dev eth0",
                        "link set eth0 up",
                    ],
                )
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def _batch(self, ns: str, commands: Iterable[str]) -> None:
        script = "".join(f"{c}\n" for c in commands)
        result = subprocess.run(
            ["ip", "-n", ns, "-batch", "-"], input=script, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {ns} -batch failed: {result.stderr.strip()}\n{script}")

    def add_tap(self, host: str, tap: str) -> None:
        """Create a persistent TAP ``tap`` in ``host``, bridged to the segment.

        The first TAP of a host creates the host's ``br0``, moves ``eth0`` into it
        and the host's address onto it (see :meth:`mac`, :meth:`l3_interface`).
        The TAP has no carrier until someone opens it (:meth:`open_tap`).
        """
        ns = self.netns(host)
        i = self._index(host)
        if host not in self._bridged:
            self._batch(
                ns,
                [
                    f"link add br0 address {_mac(i, 2)} type bridge stp_state 0 forward_delay 0",
                    f"addr del {self.address(host)}/24 dev eth0",
                    "link set eth0 master br0",
                    f"addr add {self.address(host)}/24 dev br0",
                    "link set br0 up",
                ],
            )
            self._bridged.add(host)
        self._batch(ns, [f"tuntap add dev {tap} mode tap", f"link set {tap} master br0 up"])
        self._taps[(host, tap)] = None

    def open_tap(self, host: str, tap: str, *, timeout: float = 5.0) -> Tap:
        """Open ``tap`` (``IFF_TAP | IFF_NO_PI``) and wait until its bridge port forwards.

        Opening a TAP gives it carrier; the bridge learns that through the kernel's
        link watcher, which may take up to a second. Blocking: from Trio, call it
        through ``trio.to_thread.run_sync``.
        """
        if (host, tap) not in self._taps:
            raise KeyError(f"no TAP {tap!r} on {host!r}: add_tap() first")

        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                ifr = struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI)
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            return fd

        handle = Tap(call_in_netns(self.netns(host), attach), tap)
        try:
            self.wait_forwarding(host, tap, timeout=timeout)
        except BaseException:
            handle.close()
            raise
        return handle

    def wait_forwarding(self, host: str, ifname: str, *, timeout: float = 5.0) -> None:
        """Block until bridge port ``ifname`` of ``host`` is up and forwarding."""
        deadline = time.monotonic() + timeout
        while True:
            out = _ip("-n", self.netns(host), "-d", "-j", "link", "show", "dev", ifname).stdout
            info: Any = json.loads(out)[0]
            slave = info.get("linkinfo", {}).get("info_slave_data", {})
            if slave.get("state") == "forwarding" and "LOWER_UP" in info.get("flags", []):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{ifname} not forwarding after {timeout} s: {slave}")
            time.sleep(0.02)

    # -- using -------------------------------------------------------------------------

    def _exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def run(
        self, host: str, argv: Sequence[str], *, check: bool = True, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``host`` and capture its output (text)."""
        return subprocess.run(
            self._exec_argv(host, argv),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside ``host`` (``subprocess.Popen`` keyword arguments)."""
        return subprocess.Popen(self._exec_argv(host, argv), **kwargs)

    def socket(
        self,
        host: str,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_DGRAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket living in ``host``'s namespace (wrap it with ``trio.socket``)."""
        return call_in_netns(self.netns(host), lambda: socket.socket(family, type, proto))

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace of this topology (and so everything inside them)."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for name in reversed(self._created):
            result = _ip("netns", "del", name, check=False)
            if result.returncode != 0 and name in _netns_names():
                errors.append(f"{name}: {result.stderr.strip()}")
        self._created.clear()
        _live.discard(self)
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Topology:
        return await trio.to_thread.run_sync(self.create)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.close)


@atexit.register
def _close_all() -> None:
    for topo in list(_live):
        try:
            topo.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


# --- frames -----------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(
    *,
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: str,
    dst_ip: str,
    src_port: int,
    dst_port: int,
    payload: bytes,
) -> bytes:
    """An Ethernet II / IPv4 / UDP frame, checksums filled in, as a guest would send."""
    src = socket.inet_aton(src_ip)
    dst = socket.inet_aton(dst_ip)
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", src_port, dst_port, udp_len, 0) + payload
    udp_sum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, src, dst
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + struct.pack("!H", 0x0800) + ip + udp
