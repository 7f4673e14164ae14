"""A TAP device in the calling thread's network namespace, opened non-blocking.

``Tap.open(name)`` attaches to an existing TAP link of that name, or creates one.
A link tremus creates is *not* made persistent: the kernel deletes it when its file
descriptor closes, so nothing is left behind even if the process is killed. A link
that already existed is kept; whatever tremus changed on it (brought it up, added
it to a bridge) is undone on ``close()``.

Everything here is ioctls on the TUN character device and on an ``AF_INET`` socket
(``SIOCSIFFLAGS``, ``SIOCBRADDIF``): no ``ip`` subprocesses, and all of it happens
in the network namespace of the calling thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import final

from tremus.domains.base import DomainError

__all__ = ["Tap", "valid_ifname"]

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCBRADDIF = 0x89A2
SIOCBRDELIF = 0x89A3
IFF_UP = 0x1
IFNAMSIZ = 16
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INDEX = struct.Struct("16si20x")
READ_SIZE = 65536
_NETLINK_ROUTE = 0
_RTM_NEWLINK = 16
_RTM_GETLINK = 18
_NLM_F_REQUEST = 1
_IFLA_MASTER = 10
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")


def valid_ifname(name: str) -> bool:
    """Whether ``name`` is a usable Linux interface name."""
    return (
        0 < len(name.encode()) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in name for c in "/:") and not any(c.isspace() for c in name)
    )


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _master_index(index: int) -> int | None:
    """IFLA_MASTER of link ``index`` in the calling thread's namespace (one netlink query)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       _NETLINK_ROUTE) as sock:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _RTM_GETLINK, _NLM_F_REQUEST,
                                 1, 0) + body)
        data = sock.recv(65536)
    length, mtype, _, _, _ = _NLMSGHDR.unpack_from(data)
    if mtype != _RTM_NEWLINK:
        return None
    offset = _NLMSGHDR.size + _IFINFOMSG.size
    end = min(length, len(data))
    while offset + 4 <= end:
        rta_len, rta_type = struct.unpack_from("=HH", data, offset)
        if rta_len < 4:
            break
        if rta_type & 0x3FFF == _IFLA_MASTER and rta_len >= 8:
            return int(struct.unpack_from("=I", data, offset + 4)[0])
        offset += (rta_len + 3) & ~3
    return None


@final
class Tap:
    """An open TAP link (``IFF_TAP | IFF_NO_PI``): whole Ethernet frames, no header."""

    def __init__(self, name: str, fd: int, *, created: bool) -> None:
        self.name = name
        self.fd = fd
        #: tremus created the link (it disappears when ``fd`` closes).
        self.created = created
        self.bridge: str | None = None
        self._brought_up = False
        self._attached = False

    @classmethod
    def open(cls, name: str, *, bridge: str | None = None) -> Tap:
        """Open (or create) TAP ``name``, bring it up, optionally add it to ``bridge``."""
        if not valid_ifname(name):
            raise DomainError(f"tap={name!r} is not a valid interface name (1..15 characters)")
        bridge_index = None
        if bridge is not None:
            bridge_index = _ifindex(bridge)
            if bridge_index is None:
                raise DomainError(f"bridge {bridge!r} does not exist in this network namespace")
        existed = _ifindex(name) is not None
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DomainError(f"{TUN_PATH} does not exist: this host has no TUN/TAP") from None
        except PermissionError:
            raise DomainError(f"{TUN_PATH}: permission denied (run as root)") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:
                raise DomainError(f"tap {name!r} is already in use by another process") from None
            if exc.errno == errno.EINVAL and existed:
                raise DomainError(f"interface {name!r} exists and is not a TAP device") from None
            if exc.errno == errno.EPERM:
                raise DomainError(f"tap {name!r}: permission denied (run as root)") from None
            raise DomainError(f"cannot open tap {name!r}: {exc.strerror}") from None
        tap = cls(name, fd, created=not existed)
        try:
            tap._set_up(True)
            if bridge is not None and bridge_index is not None:
                tap._attach(bridge)
        except BaseException:
            tap.close()
            raise
        return tap

    # -- frames ---------------------------------------------------------------------
    def read(self) -> bytes | None:
        """The next frame the host sent to the guest, or None if there is none now."""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, frame: bytes | bytearray | memoryview) -> bool:
        """Hand a frame from the guest to the host; False if the kernel dropped it."""
        try:
            return os.write(self.fd, frame) == len(frame)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOBUFS):  # link down, bad frame
                return False
            raise

    def fileno(self) -> int:
        return self.fd

    # -- link management ------------------------------------------------------------
    def _ctl(self, request: int, payload: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            return fcntl.ioctl(sock.fileno(), request, payload)

    def _set_up(self, up: bool) -> None:
        try:
            raw = self._ctl(SIOCGIFFLAGS, _IFREQ_FLAGS.pack(self.name.encode(), 0))
            flags = _IFREQ_FLAGS.unpack(raw)[1]
            if bool(flags & IFF_UP) == up:
                return
            flags = (flags | IFF_UP) if up else (flags & ~IFF_UP)
            self._ctl(SIOCSIFFLAGS, _IFREQ_FLAGS.pack(self.name.encode(), flags & 0xFFFF))
        except OSError as exc:
            raise DomainError(f"cannot set tap {self.name!r} {'up' if up else 'down'}: "
                              f"{exc.strerror}") from None
        self._brought_up = up

    def _attach(self, bridge: str) -> None:
        index = _ifindex(self.name)
        assert index is not None
        try:
            self._ctl(SIOCBRADDIF, _IFREQ_INDEX.pack(bridge.encode(), index))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                # Already a port: of this bridge (fine) or of another one (not fine).
                if self._master() == bridge:
                    self.bridge = bridge
                    return
                raise DomainError(f"tap {self.name!r} is already a port of another "
                                  f"bridge or bond") from None
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise DomainError(f"{bridge!r} is not a bridge") from None
            raise DomainError(f"cannot add tap {self.name!r} to bridge {bridge!r}: "
                              f"{exc.strerror}") from None
        self.bridge = bridge
        self._attached = True

    def _master(self) -> str | None:
        """The name of the link's master device (bridge, bond), from RTM_GETLINK."""
        index = _ifindex(self.name)
        if index is None:
            return None
        master = _master_index(index)
        if master is None:
            return None
        try:
            return socket.if_indextoname(master)
        except OSError:
            return None

    def close(self) -> None:
        """Undo what ``open`` changed and close the descriptor (idempotent)."""
        if self.fd < 0:
            return
        if not self.created:
            # Best effort: the link may have been deleted under us.
            if self._attached and self.bridge is not None:
                index = _ifindex(self.name)
                if index is not None:
                    try:
                        self._ctl(SIOCBRDELIF, _IFREQ_INDEX.pack(self.bridge.encode(), index))
                    except OSError:
                        pass
            if self._brought_up:
                try:
                    self._set_up(False)
                except DomainError:
                    pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
