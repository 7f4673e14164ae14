"""Output commit with NFQUEUE: network buffering for kernels without ``sch_plug``.

The guest's TAP is a port of a Linux bridge. With ``br_netfilter`` and
``net.bridge.bridge-nf-call-iptables=1``, bridged IPv4 frames traverse iptables'
FORWARD chain, where ::

    iptables -I FORWARD -m physdev --physdev-in TAP -j NFQUEUE --queue-num N

hands every frame *from* the guest to queue ``N``. tremus binds that queue over
``NETLINK_NETFILTER`` in meta-only copy mode (the kernel sends ids, not payloads),
so the packets wait in the kernel while tremus only learns their ids. Ids grow by
one per queued packet, so an epoch is an id range:

* ``postsuspend(epoch)`` records "epoch ends at the highest id seen so far";
* ``commit(epoch)`` sends one ``NFQNL_MSG_VERDICT_BATCH`` ACCEPT up to that id;
* ``release_all()`` accepts everything and then every new packet on arrival.

Several epochs may be closed and not yet committed (``max_inflight`` is large);
commits release them in order. A packet the guest sent before it was suspended but
that reached the queue after ``postsuspend`` lands in the next epoch: released
later than necessary, never earlier.

Never fail open: no ``--queue-bypass``, no ``NFQA_CFG_F_FAIL_OPEN``. If tremus
dies or unbinds, the kernel drops what is queued and the rule drops what comes.

What is not buffered:
  * ARP: bridged ARP never reaches iptables (arptables has no NFQUEUE target), so
    ARP requests and replies leave unbuffered. They carry no state a failover
    could contradict except the guest's MAC/IP binding, which is the same on the
    backup.
  * IPv6 is steered the same way with ``ip6tables`` (and
    ``bridge-nf-call-ip6tables=1``) when ``ip6tables`` is installed; without it,
    IPv6 leaves unbuffered and setup logs a warning (``ipv6=True`` makes it an
    error).
  * Other ethertypes are not buffered either.

Shape: the receive task needs a nursery, so the device is an async context
manager that owns one; the :class:`CheckpointDevice` calls happen inside it::

    async with NfqueueBuffer("tg0", 5, netns="host-a") as buf:
        await buf.setup()          # or a DeviceRunner([buf, ...]).setup()
        ...
        await buf.teardown()       # also done on exit, even after errors

``net.bridge.bridge-nf-call-iptables`` is set to 1 and left so at teardown: other
users of the bridge (another buffer on the same bridge) may rely on it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import struct
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Final, final

import trio

from tremus.buffers.netlink import (
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkMessage,
    NetlinkSocket,
    call_in_netns,
    iter_attrs,
    pack_attr,
    pack_header,
)

__all__ = [
    "NFQNL_COPY_META",
    "NF_ACCEPT",
    "NF_DROP",
    "NfqPacket",
    "NfqueueBuffer",
    "NfqueueSetupError",
    "id_after",
    "nfq_bind_msg",
    "nfq_maxlen_msg",
    "nfq_params_msg",
    "nfq_unbind_msg",
    "nfq_verdict_batch_msg",
    "parse_packet",
]

log = logging.getLogger(__name__)

_NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = (_NFNL_SUBSYS_QUEUE << 8) | 0
NFQNL_MSG_VERDICT: Final = (_NFNL_SUBSYS_QUEUE << 8) | 1
NFQNL_MSG_CONFIG: Final = (_NFNL_SUBSYS_QUEUE << 8) | 2
NFQNL_MSG_VERDICT_BATCH: Final = (_NFNL_SUBSYS_QUEUE << 8) | 3

_NFQA_CFG_CMD: Final = 1
_NFQA_CFG_PARAMS: Final = 2
_NFQA_CFG_QUEUE_MAXLEN: Final = 3
_NFQNL_CFG_CMD_BIND: Final = 1
_NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_META: Final = 1

_NFQA_PACKET_HDR: Final = 1
_NFQA_VERDICT_HDR: Final = 2
NF_DROP: Final = 0
NF_ACCEPT: Final = 1

_NFGEN: Final = struct.Struct("=BBH")  # family, version, res_id (already big-endian)
_MASK32: Final = 0xFFFFFFFF
_BRIDGE_SYSCTL: Final = "/proc/sys/net/bridge/bridge-nf-call-{}"


class NfqueueSetupError(RuntimeError):
    """NFQUEUE buffering could not be put in place (and nothing was left behind)."""


def id_after(a: int, b: int) -> bool:
    """Whether packet id ``a`` comes after ``b``, across the 32-bit wrap."""
    return 0 < ((a - b) & _MASK32) < 0x80000000


# --- message builders (pure) ----------------------------------------------------------


def _nfq_msg(mtype: int, flags: int, queue_num: int, seq: int, attrs: bytes) -> bytes:
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number out of range: {queue_num}")
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(queue_num)) + attrs
    return pack_header(16 + len(body), mtype, flags, seq) + body


def nfq_bind_msg(queue_num: int, seq: int, pf: int = socket.AF_INET) -> bytes:
    """NFQNL_MSG_CONFIG / NFQA_CFG_CMD BIND, with ACK (EBUSY if another socket has it)."""
    cmd = struct.pack("!BxH", _NFQNL_CFG_CMD_BIND, pf)
    return _nfq_msg(
        NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue_num, seq, pack_attr(_NFQA_CFG_CMD, cmd)
    )


def nfq_unbind_msg(queue_num: int, seq: int, pf: int = socket.AF_INET) -> bytes:
    """NFQNL_MSG_CONFIG / NFQA_CFG_CMD UNBIND, with ACK (queued packets are dropped)."""
    cmd = struct.pack("!BxH", _NFQNL_CFG_CMD_UNBIND, pf)
    return _nfq_msg(
        NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue_num, seq, pack_attr(_NFQA_CFG_CMD, cmd)
    )


def nfq_params_msg(
    queue_num: int, seq: int, copy_range: int = 0, mode: int = NFQNL_COPY_META
) -> bytes:
    """NFQNL_MSG_CONFIG / NFQA_CFG_PARAMS: copy mode (meta only by default), with ACK."""
    params = struct.pack("!IB", copy_range, mode)  # nla_len 9, as the kernel expects
    return _nfq_msg(
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        queue_num,
        seq,
        pack_attr(_NFQA_CFG_PARAMS, params),
    )


def nfq_maxlen_msg(queue_num: int, maxlen: int, seq: int) -> bytes:
    """NFQNL_MSG_CONFIG / NFQA_CFG_QUEUE_MAXLEN: how many packets the kernel holds."""
    return _nfq_msg(
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        queue_num,
        seq,
        pack_attr(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)),
    )


def nfq_verdict_batch_msg(
    queue_num: int, packet_id: int, seq: int, verdict: int = NF_ACCEPT, *, ack: bool = True
) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: ``verdict`` for every queued packet with id <= ``packet_id``."""
    hdr = struct.pack("!II", verdict, packet_id & _MASK32)
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return _nfq_msg(
        NFQNL_MSG_VERDICT_BATCH, flags, queue_num, seq, pack_attr(_NFQA_VERDICT_HDR, hdr)
    )


@final
@dataclass(frozen=True, slots=True)
class NfqPacket:
    """What a meta-only NFQNL_MSG_PACKET tells: which queue, which packet."""

    queue_num: int
    packet_id: int
    hw_protocol: int
    hook: int


def parse_packet(msg: NetlinkMessage) -> NfqPacket | None:
    """Decode an NFQNL_MSG_PACKET; ``None`` for any other or a malformed message."""
    if msg.type != NFQNL_MSG_PACKET or len(msg.payload) < _NFGEN.size:
        return None
    _, _, res_id = _NFGEN.unpack_from(msg.payload)
    for atype, payload in iter_attrs(msg.payload, _NFGEN.size):
        if atype == _NFQA_PACKET_HDR and len(payload) >= 7:
            packet_id, hw_protocol, hook = struct.unpack_from("!IHB", payload)
            return NfqPacket(socket.ntohs(res_id), packet_id, hw_protocol, hook)
    return None


# --- the device -------------------------------------------------------------------------


@final
@dataclass(slots=True)
class _Closed:
    epoch: int
    last_id: int | None  # highest packet id seen when the epoch was closed
    seen: int  # packets seen in total when the epoch was closed


@final
class NfqueueBuffer:
    """Network output buffer on NFQUEUE (a :class:`CheckpointDevice`).

    Use inside ``async with`` (it owns the nursery of its receive task); see the
    module docstring.
    """

    max_inflight: int = 1 << 20

    def __init__(
        self,
        interface: str,
        queue_num: int,
        netns: str | None = None,
        *,
        ipv6: bool | None = None,
        queue_maxlen: int = 65536,
        timeout: float = 5.0,
    ) -> None:
        """Describe the buffer; nothing happens before :meth:`setup`.

        Args:
            interface: the guest's TAP, a port of a bridge in ``netns``.
            queue_num: NFQUEUE number (0-65535), unique per namespace.
            netns: network namespace of the bridge (name or path); default ours.
            ipv6: steer IPv6 with ip6tables: ``None`` if ip6tables is installed,
                ``True`` required, ``False`` never.
            queue_maxlen: packets the kernel may hold for us (beyond: dropped).
            timeout: seconds to wait for each netlink answer or iptables run.
        """
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"queue number out of range: {queue_num}")
        self.interface = interface
        self.queue_num = queue_num
        self.netns = netns
        self.name = f"nfqueue:{interface}:{queue_num}"
        self.ipv6 = ipv6
        self.queue_maxlen = queue_maxlen
        self.timeout = timeout
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._receiver: trio.CancelScope | None = None
        self._sock: NetlinkSocket | None = None
        self._bound = False
        self._rules: list[list[str]] = []  # iptables argv (after the binary) inserted
        self._closed: deque[_Closed] = deque()
        self._last_epoch: int | None = None
        self._passthrough = False
        #: Highest packet id seen (``None`` before the first packet).
        self.last_id: int | None = None
        #: Packets seen on the queue since setup.
        self.seen = 0
        #: Called when the open epoch gets its first packet (output-triggered engines).
        self.on_output: Callable[[], None] | None = None
        self._output_in_epoch = False
        #: Packets released by commits and release_all.
        self.released = 0

    @property
    def overruns(self) -> int:
        """How often the receive buffer overflowed.

        The kernel drops a packet it cannot report to us (never fail open), so an
        overrun loses packets, not the buffer's accounting.
        """
        return self._sock.overruns if self._sock is not None else 0

    # -- context manager -------------------------------------------------------------

    async def __aenter__(self) -> NfqueueBuffer:
        if self._nursery is not None:
            raise RuntimeError(f"{self.name}: already entered")
        self._stack = AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        teardown_error: Exception | None = None
        try:
            with trio.CancelScope(shield=True):
                await self.teardown()
        except Exception as err:  # noqa: BLE001 - raised below, after the nursery closed
            teardown_error = err
        self._nursery = None
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The nursery wraps the body's own exception in a group; hand the body's
            # exception back unwrapped, as if there were no nursery.
            if exc is None or group.split(lambda e: e is exc)[1] is not None:
                raise
        if teardown_error is not None:
            raise teardown_error
        return False

    # -- setup -----------------------------------------------------------------------

    async def setup(self) -> None:
        """Bind the queue, start receiving, then steer the TAP's frames to it.

        Binding comes first so that no frame meets a rule without a listener (it
        would be dropped). On failure everything done so far is undone.
        """
        if self._nursery is None:
            raise RuntimeError(f"{self.name}: use `async with NfqueueBuffer(...) as buf:`")
        if self._sock is not None:
            raise RuntimeError(f"{self.name}: already set up")
        try:
            await self._setup_steps()
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.teardown()
                except Exception as exc:  # noqa: BLE001 - the setup error matters more
                    log.warning("%s: rollback after failed setup: %s", self.name, exc)
            raise

    async def _setup_steps(self) -> None:
        assert self._nursery is not None
        use_v6 = await self._check_prerequisites()
        self._sock = NetlinkSocket.open(
            NETLINK_NETFILTER, netns=self.netns, rcvbuf=1 << 22, keep_unsolicited=True
        )
        sock = self._sock
        q = self.queue_num
        try:
            await sock.request(nfq_bind_msg(q, 0), timeout=self.timeout, what=f"bind NFQUEUE {q}")
        except NetlinkError as exc:
            if exc.errno in (errno.EBUSY, errno.EPERM):
                raise NfqueueSetupError(
                    f"{self.name}: NFQUEUE {q} is already bound by another process "
                    f"in this network namespace; pick another queue number ({exc})"
                ) from exc
            raise
        self._bound = True
        await sock.request(
            nfq_params_msg(q, 0),
            timeout=self.timeout,
            what=f"set meta-only copy mode on NFQUEUE {q}",
        )
        await sock.request(
            nfq_maxlen_msg(q, self.queue_maxlen, 0),
            timeout=self.timeout,
            what=f"set NFQUEUE {q} length to {self.queue_maxlen}",
        )
        self._receiver = await self._nursery.start(self._receive_loop)
        await self._sysctl("iptables", "1")
        await self._add_rule("iptables")
        if use_v6:
            await self._sysctl("ip6tables", "1")
            await self._add_rule("ip6tables")

    async def _check_prerequisites(self) -> bool:
        """br_netfilter and the iptables binaries; returns whether IPv6 is steered."""
        if shutil.which("iptables") is None:
            raise NfqueueSetupError(
                f"{self.name}: `iptables` is not installed (apt-get install -y iptables)"
            )
        use_v6 = self.ipv6 is not False and shutil.which("ip6tables") is not None
        if self.ipv6 and not use_v6:
            raise NfqueueSetupError(f"{self.name}: ipv6=True but `ip6tables` is not installed")
        if not use_v6 and self.ipv6 is None:
            log.warning(
                "%s: ip6tables not installed: IPv6 from the guest is NOT buffered", self.name
            )
        if not await self._has_bridge_sysctls():
            try:
                result = await trio.run_process(
                    ["modprobe", "br_netfilter"], check=False, capture_stderr=True
                )
                reason = (
                    result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
                )
            except OSError as exc:  # no modprobe binary
                reason = str(exc)
            if not await self._has_bridge_sysctls():
                raise NfqueueSetupError(
                    f"{self.name}: br_netfilter is not available (`modprobe br_netfilter`: "
                    f"{reason}); bridged frames cannot reach iptables"
                )
        return use_v6

    async def _has_bridge_sysctls(self) -> bool:
        path = _BRIDGE_SYSCTL.format("iptables")
        return await trio.to_thread.run_sync(
            call_in_netns, self.netns, lambda: os.path.exists(path)
        )

    async def _sysctl(self, which: str, value: str) -> None:
        path = _BRIDGE_SYSCTL.format(which)

        def write() -> None:
            with open(path, "w") as f:
                f.write(value)

        await trio.to_thread.run_sync(call_in_netns, self.netns, write)

    def _netns_argv(self) -> list[str]:
        if self.netns is None:
            return []
        if "/" in self.netns:
            return ["nsenter", f"--net={self.netns}", "--"]
        return ["ip", "netns", "exec", self.netns]

    def _rule(self) -> list[str]:
        return [
            "FORWARD",
            "-m",
            "physdev",
            "--physdev-in",
            self.interface,
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(self.queue_num),
        ]

    async def _iptables(self, binary: str, op: str, rule: list[str]) -> None:
        argv = [*self._netns_argv(), binary, "-w", op, *rule]
        with trio.fail_after(self.timeout):
            result = await trio.run_process(
                argv, check=False, capture_stderr=True, capture_stdout=True
            )
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            raise NfqueueSetupError(f"{self.name}: `{' '.join(argv)}` failed: {err}")

    async def _add_rule(self, binary: str) -> None:
        # A primary that was SIGKILLed left its rule behind (fail-closed, as it must):
        # take over any copies of ours so that teardown leaves none.
        for _ in range(64):
            try:
                await self._iptables(binary, "-D", self._rule())
            except NfqueueSetupError:
                break
        await self._iptables(binary, "-I", self._rule())
        self._rules.append([binary, *self._rule()])

    # -- receiving -------------------------------------------------------------------

    async def _receive_loop(
        self, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = self._sock
        assert sock is not None
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                try:
                    msg = await sock.receive()
                except trio.ClosedResourceError:
                    return
                self._note(msg)
                if self._passthrough and self.last_id is not None:
                    await self._accept_new(ack=False)

    def _note(self, msg: NetlinkMessage) -> None:
        packet = parse_packet(msg)
        if packet is None or packet.queue_num != self.queue_num:
            return
        self.seen += 1
        if self.last_id is None or id_after(packet.packet_id, self.last_id):
            self.last_id = packet.packet_id
        if not self._passthrough and not self._output_in_epoch:
            self._output_in_epoch = True
            if self.on_output is not None:
                self.on_output()

    def _take_pending(self) -> None:
        """Account for everything the kernel has already sent us."""
        assert self._sock is not None
        while True:
            try:
                msg = self._sock.receive_nowait()
            except trio.WouldBlock:
                return
            self._note(msg)

    async def _verdict(self, upto: int, *, ack: bool) -> bool:
        """ACCEPT every queued packet up to ``upto``; False if none was queued."""
        assert self._sock is not None
        msg = nfq_verdict_batch_msg(self.queue_num, upto, 0)
        if not ack:
            await self._sock.send(nfq_verdict_batch_msg(self.queue_num, upto, 0, ack=False))
            return True
        try:
            await self._sock.request(
                msg, timeout=self.timeout, what=f"accept packets up to id {upto}"
            )
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                # Nothing left to accept: the kernel dropped them (e.g. the TAP went down).
                log.warning("%s: no queued packet up to id %d to release", self.name, upto)
                return False
            raise
        return True

    async def _accept_new(self, *, ack: bool) -> int:
        count = self.seen - self.released
        if count <= 0 or self.last_id is None:
            return 0
        self.released = self.seen
        await self._verdict(self.last_id, ack=ack)
        return count

    # -- epochs ------------------------------------------------------------------------

    def _require_setup(self) -> NetlinkSocket:
        if self._sock is None:
            raise RuntimeError(f"{self.name}: not set up")
        return self._sock

    async def postsuspend(self, epoch: int) -> None:
        """Close ``epoch`` at the highest packet id the kernel has reported."""
        self._require_setup()
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(f"{self.name}: epoch {epoch} closed after epoch {self._last_epoch}")
        self._take_pending()
        self._closed.append(_Closed(epoch, self.last_id, self.seen))
        self._last_epoch = epoch
        self._output_in_epoch = False
        await trio.lowlevel.checkpoint()

    async def preresume(self, epoch: int) -> None:
        """Nothing to do: packets after the boundary already belong to the next epoch."""
        await trio.lowlevel.checkpoint()

    async def commit(self, epoch: int) -> int:
        """Release every closed epoch up to ``epoch`` with one batch verdict.

        Returns how many packets were released (0 for epochs without packets).
        """
        self._require_setup()
        if self._passthrough:
            await trio.lowlevel.checkpoint()
            return 0
        if not any(c.epoch == epoch for c in self._closed):
            raise ValueError(f"{self.name}: commit({epoch}) for an epoch that is not closed")
        target = self._closed.popleft()
        while target.epoch != epoch:
            target = self._closed.popleft()
        count = target.seen - self.released
        if count <= 0 or target.last_id is None:
            await trio.lowlevel.checkpoint()
            return 0
        accepted = await self._verdict(target.last_id, ack=True)
        self.released = target.seen
        return count if accepted else 0

    async def release_all(self) -> None:
        """Accept everything queued, then every new packet as it arrives."""
        self._require_setup()
        self._passthrough = True
        self._closed.clear()
        self._take_pending()
        await self._accept_new(ack=True)

    # -- teardown ----------------------------------------------------------------------

    async def teardown(self) -> None:
        """Delete the rules, unbind the queue (the kernel drops what it still holds).

        Runs every step even if an earlier one fails; raises the first failure.
        """
        first_error: BaseException | None = None
        with trio.CancelScope(shield=True):
            for rule in reversed(self._rules):
                try:
                    await self._iptables(rule[0], "-D", rule[1:])
                except Exception as exc:  # noqa: BLE001 - keep tearing down
                    log.warning("%s: teardown: %s", self.name, exc)
                    first_error = first_error or exc
            self._rules.clear()
            sock = self._sock
            if sock is not None and self._bound:
                try:
                    await sock.request(
                        nfq_unbind_msg(self.queue_num, 0),
                        timeout=self.timeout,
                        what=f"unbind NFQUEUE {self.queue_num}",
                    )
                except (NetlinkError, trio.ClosedResourceError) as exc:
                    log.warning("%s: teardown: %s", self.name, exc)
                    first_error = first_error or exc
            self._bound = False
            if self._receiver is not None:
                self._receiver.cancel()
                self._receiver = None
            if sock is not None:
                sock.close()
            self._sock = None
            self._closed.clear()
            self._last_epoch = None
            self._passthrough = False
        if first_error is not None:
            raise first_error
