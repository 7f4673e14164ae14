"""A netlink socket driven by Trio.

pyroute2 0.9's socket layer runs on asyncio, so tremus keeps pyroute2 for what it
is good at (encoding and decoding rtnetlink messages) and talks to the kernel over
its own non-blocking ``AF_NETLINK`` socket here. One socket serves two kinds of
traffic at once:

* requests (``await sock.request(msg)``): the socket stamps a fresh sequence number,
  collects the replies carrying it (one message, a multipart dump up to
  ``NLMSG_DONE``, or an ACK) and turns a negative ``NLMSG_ERROR`` into
  :class:`NetlinkError`;
* unsolicited messages (``await sock.receive()``): nfqueue packets, multicast
  notifications.

Only one task reads the file descriptor at a time; whichever task reads dispatches
every message it finds, so a request can complete while another task is blocked in
``receive()`` and the other way round.

Sockets can be opened inside another network namespace: the socket is created in a
short-lived thread that ``setns()``-es into it, and a socket keeps the namespace it
was created in for its whole life.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar, final

import trio

__all__ = [
    "NETLINK_NETFILTER",
    "NETLINK_ROUTE",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_ACK",
    "NLM_F_CREATE",
    "NLM_F_DUMP",
    "NLM_F_EXCL",
    "NLM_F_MULTI",
    "NLM_F_REQUEST",
    "NetlinkError",
    "NetlinkMessage",
    "NetlinkSocket",
    "call_in_netns",
    "encode",
    "iter_attrs",
    "netns_path",
    "pack_attr",
    "parse_messages",
]

NETLINK_ROUTE: Final = 0
NETLINK_NETFILTER: Final = 12

NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4
NLM_F_ECHO: Final = 0x8
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_DUMP: Final = 0x300
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
#: In an NLMSG_ERROR: the echoed request is only its header.
NLM_F_CAPPED: Final = 0x100
#: In an NLMSG_ERROR: extended-ACK attributes follow the echoed request.
NLM_F_ACK_TLVS: Final = 0x200

NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4

_SOL_NETLINK: Final = 270
_NETLINK_ADD_MEMBERSHIP: Final = 1
_NETLINK_CAP_ACK: Final = 10
_NETLINK_EXT_ACK: Final = 11
_NLMSGERR_ATTR_MSG: Final = 1

_NLA_TYPE_MASK: Final = 0x3FFF
_HEADER: Final = struct.Struct("=IHHII")
_CLONE_NEWNET: Final = 0x40000000
_RECV_SIZE: Final = 1 << 17

# Message types named in error messages when the caller gives no description.
_TYPE_NAMES: Final[dict[tuple[int, int], str]] = {
    (NETLINK_ROUTE, 16): "RTM_NEWLINK",
    (NETLINK_ROUTE, 17): "RTM_DELLINK",
    (NETLINK_ROUTE, 18): "RTM_GETLINK",
    (NETLINK_ROUTE, 19): "RTM_SETLINK",
    (NETLINK_ROUTE, 36): "RTM_NEWQDISC",
    (NETLINK_ROUTE, 37): "RTM_DELQDISC",
    (NETLINK_ROUTE, 38): "RTM_GETQDISC",
    (NETLINK_ROUTE, 44): "RTM_NEWTFILTER",
    (NETLINK_ROUTE, 45): "RTM_DELTFILTER",
    (NETLINK_ROUTE, 46): "RTM_GETTFILTER",
    (NETLINK_NETFILTER, 0x0301): "NFQNL_MSG_VERDICT",
    (NETLINK_NETFILTER, 0x0302): "NFQNL_MSG_CONFIG",
    (NETLINK_NETFILTER, 0x0303): "NFQNL_MSG_VERDICT_BATCH",
}

# What an errno means for a given request, for kernels or paths that send no
# extended-ACK text. The wording follows the kernel's own extack strings.
_MEANINGS: Final[dict[tuple[int, int, int], str]] = {
    (NETLINK_ROUTE, 36, _errno.ENOENT): "Specified qdisc kind is unknown",
    (NETLINK_ROUTE, 36, _errno.EEXIST): "Exclusivity flag on, cannot modify",
    (NETLINK_ROUTE, 37, _errno.ENOENT): "Cannot find specified qdisc on specified device",
    (NETLINK_ROUTE, 37, _errno.EINVAL): "Cannot delete qdisc with handle of zero",
    (NETLINK_ROUTE, 44, _errno.ENOENT): "Specified filter kind or parent qdisc is unknown",
    (NETLINK_ROUTE, 45, _errno.ENOENT): "Filter with specified priority/protocol not found",
    (NETLINK_ROUTE, 16, _errno.EOPNOTSUPP): "Unknown device type",
    (NETLINK_ROUTE, 16, _errno.EEXIST): "A device with this name already exists",
    (NETLINK_ROUTE, 16, _errno.ENODEV): "Cannot find device",
    (NETLINK_ROUTE, 17, _errno.ENODEV): "Cannot find device",
    (NETLINK_ROUTE, 18, _errno.ENODEV): "Cannot find device",
    (NETLINK_NETFILTER, 0x0302, _errno.EBUSY): "Queue is bound by another socket",
    (NETLINK_NETFILTER, 0x0302, _errno.EPERM): "Queue is bound by another socket",
    (NETLINK_NETFILTER, 0x0303, _errno.ENOENT): "No queued packet matched the verdict",
    (NETLINK_NETFILTER, 0x0303, _errno.ENODEV): "Queue is not bound",
}


class NetlinkError(OSError):
    """The kernel refused a netlink request, or never answered it.

    Carries ``errno`` (positive) and a message naming what was asked and the
    kernel's reason in words, e.g. ``add plug qdisc on ifb0: Specified qdisc kind
    is unknown (ENOENT)``, so that a failing setup step explains itself.
    """

    def __init__(self, errno: int, what: str, detail: str | None = None) -> None:
        """Build the error.

        Args:
            errno: positive error number.
            what: the request in words ("add ingress qdisc on tg0").
            detail: the kernel's extended-ACK text or a known meaning; defaults
                to ``os.strerror(errno)``.
        """
        self.what = what
        self.detail = detail or os.strerror(errno)
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(errno, f"{what}: {self.detail} ({name})")

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.what, self.detail))


@final
@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    """One netlink message as received: its header fields and the whole bytes."""

    type: int
    flags: int
    seq: int
    pid: int
    #: The whole message, header included (what pyroute2's classes decode).
    data: bytes

    @property
    def payload(self) -> bytes:
        """The bytes after the 16-byte ``nlmsghdr``."""
        return self.data[_HEADER.size :]

    def decode(self, cls: Callable[[bytes], Any]) -> Any:
        """Decode with a pyroute2 message class (``tcmsg``, ``ifinfmsg`` ...)."""
        msg = cls(self.data)
        msg.decode()
        return msg


def parse_messages(buf: bytes) -> list[NetlinkMessage]:
    """Split one datagram into messages; stop at a malformed length."""
    out: list[NetlinkMessage] = []
    offset = 0
    while offset + _HEADER.size <= len(buf):
        length, mtype, flags, seq, pid = _HEADER.unpack_from(buf, offset)
        if length < _HEADER.size or offset + length > len(buf):
            break
        out.append(NetlinkMessage(mtype, flags, seq, pid, bytes(buf[offset : offset + length])))
        offset += (length + 3) & ~3
    return out


def iter_attrs(buf: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(type, payload)`` of the netlink attributes in ``buf[offset:]``.

    The type has the NESTED and NET_BYTEORDER flag bits masked off.
    """
    while offset + 4 <= len(buf):
        length, atype = struct.unpack_from("=HH", buf, offset)
        if length < 4 or offset + length > len(buf):
            return
        yield atype & _NLA_TYPE_MASK, bytes(buf[offset + 4 : offset + length])
        offset += (length + 3) & ~3


def pack_attr(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def pack_header(length: int, mtype: int, flags: int, seq: int, pid: int = 0) -> bytes:
    """A 16-byte ``nlmsghdr`` in native byte order."""
    return _HEADER.pack(length, mtype, flags, seq, pid)


def encode(msg: Any, *, type: int, flags: int, seq: int, pid: int = 0) -> bytes:
    """Encode a pyroute2 message object (its fields and ``attrs`` already set).

    Args:
        msg: a pyroute2 ``nlmsg`` subclass instance such as ``tcmsg()``.
        type: netlink message type (``RTM_NEWQDISC`` ...).
        flags: ``NLM_F_*`` flags.
        seq: sequence number to put in the header.
        pid: port id; 0 addresses the kernel.
    """
    msg["header"]["type"] = type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.encode()
    return bytes(msg.data)


# --- network namespaces -----------------------------------------------------------

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """``/run/netns/NAME`` for a name as ``ip netns`` knows it; paths pass through."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def call_in_netns(netns: str | None, fn: Callable[[], _T]) -> _T:
    """Run ``fn()`` with the calling thread's network namespace set to ``netns``.

    Network namespaces are per thread, so ``fn`` runs in a fresh thread that
    enters the namespace: sockets it creates (netlink, UDP, a TAP fd's device
    lookup) and ``/proc/sys/net`` files it opens belong to ``netns``, and no
    thread of the caller (nor one of Trio's reused worker threads) is left in
    the wrong namespace. Blocks for the duration of ``fn`` (keep it short).

    Args:
        netns: a name under ``/run/netns``, a path to a namespace file, or
            ``None`` for the caller's namespace (``fn`` then runs inline).
        fn: what to run.
    """
    if netns is None:
        return fn()
    path = netns_path(netns)
    result: list[_T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target_fd)
                finally:
                    os.close(target_fd)
                try:
                    result.append(fn())
                finally:
                    _setns(own)
            finally:
                os.close(own)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


# --- the socket ---------------------------------------------------------------------


@final
class _Pending:
    """Replies collected for one outstanding request."""

    __slots__ = ("ack", "done", "error", "replies")

    def __init__(self, ack: bool) -> None:
        self.ack = ack
        self.done = False
        self.error: tuple[int, str | None] | None = None
        self.replies: list[NetlinkMessage] = []


@final
class NetlinkSocket:
    """A non-blocking ``AF_NETLINK`` socket for Trio.

    Open with :meth:`open` (optionally inside a network namespace), use as a
    context manager or call :meth:`close`. Requests enable extended ACKs so that
    errors carry the kernel's own explanation.
    """

    def __init__(self, sock: socket.socket, protocol: int, *, keep_unsolicited: bool) -> None:
        """Wrap an already bound, non-blocking netlink socket (use :meth:`open`)."""
        self._sock = sock
        self.protocol = protocol
        self.portid: int = sock.getsockname()[0]
        self._keep_unsolicited = keep_unsolicited
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._unsolicited: deque[NetlinkMessage] = deque()
        self._reading = False
        self._progress = trio.Event()
        self._closed = False
        #: How many times the kernel reported lost messages (ENOBUFS).
        self.overruns = 0

    @classmethod
    def open(
        cls,
        protocol: int,
        *,
        netns: str | None = None,
        groups: int = 0,
        rcvbuf: int | None = None,
        keep_unsolicited: bool = False,
    ) -> NetlinkSocket:
        """Create, configure and bind a netlink socket.

        Args:
            protocol: ``NETLINK_ROUTE``, ``NETLINK_NETFILTER``, ...
            netns: network namespace (name or path) to open it in.
            groups: multicast group bitmask to join at bind time.
            rcvbuf: receive buffer size; raise it for bursts of unsolicited messages.
            keep_unsolicited: queue messages no request waits for, for
                :meth:`receive`; otherwise they are dropped.
        """

        def make() -> socket.socket:
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                protocol,
            )
            try:
                if rcvbuf is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                for opt in (_NETLINK_EXT_ACK, _NETLINK_CAP_ACK):
                    try:
                        sock.setsockopt(_SOL_NETLINK, opt, 1)
                    except OSError:
                        pass  # older kernels: plain errors, still correct
                sock.bind((0, groups))
            except BaseException:
                sock.close()
                raise
            return sock

        return cls(call_in_netns(netns, make), protocol, keep_unsolicited=keep_unsolicited)

    def fileno(self) -> int:
        return self._sock.fileno()

    def add_membership(self, group: int) -> None:
        """Join multicast group number ``group`` (not a bitmask)."""
        self._sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, group)

    def close(self) -> None:
        """Close the socket; tasks blocked on it get ``trio.ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        self._wake()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        """A fresh sequence number (never 0: the kernel uses 0 for its own messages)."""
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    # -- sending ---------------------------------------------------------------------

    async def send(self, msg: bytes) -> None:
        """Send one message as is (no sequence stamping, no reply awaited)."""
        self._check_open()
        while True:
            try:
                self._sock.send(msg)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
            else:
                await trio.lowlevel.checkpoint()
                return

    async def request(
        self, msg: bytes, *, timeout: float = 5.0, what: str | None = None
    ) -> list[NetlinkMessage]:
        """Send a request and return its replies.

        The sequence number in ``msg`` is replaced by a fresh one (and the port id
        by 0). Completion: an ACK (``NLMSG_ERROR`` with 0) when ``NLM_F_ACK`` is
        set, ``NLMSG_DONE`` for multipart dumps, otherwise the first reply. The ACK
        itself is not returned.

        Args:
            msg: the encoded request, header included.
            timeout: seconds to wait for the complete answer.
            what: the request in words, for error messages.

        Raises:
            NetlinkError: the kernel answered with a negative errno, the dump was
                interrupted, or no answer came within ``timeout`` (ETIMEDOUT).
        """
        self._check_open()
        if len(msg) < _HEADER.size:
            raise ValueError("netlink message shorter than its header")
        _, mtype, flags, _, _ = _HEADER.unpack_from(msg)
        seq = self.next_seq()
        buf = bytearray(msg)
        struct.pack_into("=II", buf, 8, seq, 0)
        pending = _Pending(ack=bool(flags & NLM_F_ACK))
        self._pending[seq] = pending
        label = what or _TYPE_NAMES.get((self.protocol, mtype), f"netlink message type {mtype}")
        try:
            await self.send(bytes(buf))
            with trio.move_on_after(timeout):
                await self._pump(lambda: pending.done)
            if not pending.done:
                raise NetlinkError(
                    _errno.ETIMEDOUT, label, f"no complete answer within {timeout:g} s"
                )
        finally:
            del self._pending[seq]
        if pending.error is not None:
            err, text = pending.error
            detail = text or _MEANINGS.get((self.protocol, mtype, err))
            raise NetlinkError(err, label, detail)
        return pending.replies

    # -- receiving -------------------------------------------------------------------

    async def receive(self) -> NetlinkMessage:
        """The next message that is not a reply to one of our requests."""
        if not self._keep_unsolicited:
            raise RuntimeError("socket opened without keep_unsolicited=True")
        await self._pump(lambda: bool(self._unsolicited))
        return self._unsolicited.popleft()

    def receive_nowait(self) -> NetlinkMessage:
        """Like :meth:`receive`, but raises ``trio.WouldBlock`` instead of waiting.

        Reads what the kernel has already queued on the socket first (:meth:`drain`).
        """
        if not self._keep_unsolicited:
            raise RuntimeError("socket opened without keep_unsolicited=True")
        if not self._unsolicited:
            self.drain()
        if not self._unsolicited:
            raise trio.WouldBlock
        return self._unsolicited.popleft()

    def drain(self) -> int:
        """Read and dispatch everything already queued on the socket, without blocking.

        Returns how many messages were dispatched. Used to make a snapshot of "all
        the kernel has told us so far" (e.g. the last nfqueue packet id) current.
        """
        count = 0
        while not self._closed:
            try:
                data = self._recv()
            except BlockingIOError:
                break
            if data is None:
                continue
            count += self._dispatch(data)
        self._wake()
        return count

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("netlink socket is closed")

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _pump(self, done: Callable[[], bool]) -> None:
        # One reader at a time (Trio allows one waiter per fd); the others wait for
        # the reader to make progress, then re-check their own condition.
        while not done():
            self._check_open()
            if self._reading:
                await self._progress.wait()
                continue
            self._reading = True
            try:
                await self._read_once()
            finally:
                self._reading = False
                self._wake()

    async def _read_once(self) -> None:
        while True:
            try:
                data = self._recv()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                self._check_open()
                continue
            if data is not None:
                self._dispatch(data)
            await trio.lowlevel.checkpoint()
            return

    def _recv(self) -> bytes | None:
        try:
            data, _, msg_flags, _ = self._sock.recvmsg(_RECV_SIZE)
        except OSError as exc:
            if exc.errno == _errno.ENOBUFS:
                self.overruns += 1
                return None
            raise
        if msg_flags & socket.MSG_TRUNC:
            raise NetlinkError(_errno.EMSGSIZE, "netlink receive", "datagram truncated")
        return data

    def _dispatch(self, data: bytes) -> int:
        messages = parse_messages(data)
        for msg in messages:
            pending = self._pending.get(msg.seq)
            if pending is None or msg.pid not in (0, self.portid) or pending.done:
                if self._keep_unsolicited:
                    self._unsolicited.append(msg)
                continue
            if msg.type == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", msg.data, _HEADER.size)
                if err < 0:
                    pending.error = (-err, _ext_ack_text(msg))
                pending.done = True
            elif msg.type == NLMSG_DONE:
                if len(msg.data) >= _HEADER.size + 4:
                    (err,) = struct.unpack_from("=i", msg.data, _HEADER.size)
                    if err < 0:
                        pending.error = (-err, _ext_ack_text(msg, done=True))
                if msg.flags & NLM_F_DUMP_INTR and pending.error is None:
                    pending.error = (_errno.EINTR, "dump interrupted by a concurrent change")
                pending.done = True
            elif msg.type in (NLMSG_NOOP, NLMSG_OVERRUN):
                continue
            else:
                pending.replies.append(msg)
                if not (msg.flags & NLM_F_MULTI) and not pending.ack:
                    pending.done = True
        return len(messages)


def _ext_ack_text(msg: NetlinkMessage, *, done: bool = False) -> str | None:
    """The kernel's extended-ACK message (``NLMSGERR_ATTR_MSG``), if any."""
    if not (msg.flags & NLM_F_ACK_TLVS):
        return None
    offset = _HEADER.size + 4
    if not done:
        # struct nlmsgerr echoes the request: its header only when capped.
        if msg.flags & NLM_F_CAPPED:
            offset += _HEADER.size
        else:
            if len(msg.data) < offset + _HEADER.size:
                return None
            (echoed,) = struct.unpack_from("=I", msg.data, offset)
            offset += (echoed + 3) & ~3
    for atype, payload in iter_attrs(msg.data, offset):
        if atype == _NLMSGERR_ATTR_MSG:
            return payload.split(b"\0", 1)[0].decode(errors="replace") or None
    return None
