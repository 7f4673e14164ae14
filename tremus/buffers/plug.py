"""Output commit with ``sch_plug``: Xen Remus's network buffer, over netlink.

The guest's interface (VIF/TAP) is where the guest's *outgoing* packets enter the
host, so they arrive on that interface's ingress. ``remus-netbuf-setup`` redirects
that ingress to an IFB device and plugs the IFB's root qdisc; we do the same steps,
but all over netlink from Trio (no ``tc`` subprocesses):

1. create an IFB device (first free ``ifbN``, or a given name) and bring it up;
2. add the ``ingress`` qdisc on the guest interface;
3. add a ``u32`` match-all filter for **every** protocol (``ETH_P_ALL``; Remus
   matched ``proto ip`` only and leaked ARP and IPv6) whose action is
   ``mirred egress redirect`` to the IFB;
4. add the ``plug`` qdisc on the IFB's root with an explicit limit (without one the
   limit would be 0 and the kernel would drop every packet).

Per epoch: ``TCQ_PLUG_BUFFER`` at postsuspend closes the epoch, and
``TCQ_PLUG_RELEASE_ONE`` at commit lets the closed epoch out. ``sch_plug`` keeps
only one closed-but-unreleased epoch (a second BUFFER overwrites the count), hence
``max_inflight = 1``. ``release_all`` sends ``TCQ_PLUG_RELEASE_INDEFINITE``.

Kernels without ``CONFIG_NET_SCH_PLUG`` (like our machines') answer step 4 with
"Specified qdisc kind is unknown": setup then rolls back steps 1-3 and raises
:class:`PlugUnavailableError`, which names the alternative, ``--netbuf nfqueue``.

The message builders are pure functions so that tests compare them byte for byte
with what iproute2 6.1 sends (captured with strace).
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import struct
from collections.abc import Callable
from typing import Final, final

import trio
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from tremus.buffers.netlink import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    encode,
    pack_attr,
)

__all__ = [
    "DEFAULT_LIMIT",
    "ETH_P_ALL",
    "TCQ_PLUG_BUFFER",
    "TCQ_PLUG_LIMIT",
    "TCQ_PLUG_RELEASE_INDEFINITE",
    "TCQ_PLUG_RELEASE_ONE",
    "PlugBuffer",
    "PlugUnavailableError",
    "ifb_add_msg",
    "ingress_add_msg",
    "ingress_del_msg",
    "link_del_msg",
    "link_dump_msg",
    "link_get_msg",
    "link_up_msg",
    "plug_add_msg",
    "plug_change_msg",
    "plug_del_msg",
    "redirect_filter_add_msg",
    "redirect_filter_del_msg",
]

log = logging.getLogger(__name__)

TCQ_PLUG_BUFFER: Final = 0
TCQ_PLUG_RELEASE_ONE: Final = 1
TCQ_PLUG_RELEASE_INDEFINITE: Final = 2
TCQ_PLUG_LIMIT: Final = 3
_PLUG_ACTIONS: Final = frozenset(
    {TCQ_PLUG_BUFFER, TCQ_PLUG_RELEASE_ONE, TCQ_PLUG_RELEASE_INDEFINITE, TCQ_PLUG_LIMIT}
)

#: remus-netbuf-setup raises the plug limit to this many bytes.
DEFAULT_LIMIT: Final = 10_000_000
ETH_P_ALL: Final = 0x0003
#: Priority of our redirect filter (remus-netbuf-setup uses 10).
FILTER_PRIO: Final = 10

_RTM_NEWLINK: Final = 16
_RTM_DELLINK: Final = 17
_RTM_GETLINK: Final = 18
_RTM_NEWQDISC: Final = 36
_RTM_DELQDISC: Final = 37
_RTM_NEWTFILTER: Final = 44
_RTM_DELTFILTER: Final = 45

_IFLA_LINKINFO: Final = 18
_IFLA_INFO_KIND: Final = 1

_TC_H_ROOT: Final = 0xFFFFFFFF
_TC_H_INGRESS: Final = 0xFFFFFFF1
_INGRESS_HANDLE: Final = 0xFFFF0000
_IFF_UP: Final = 0x1
_TCA_EGRESS_REDIR: Final = 1
_TC_ACT_STOLEN: Final = 4

_F_NEW: Final = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE
_F_ACK: Final = NLM_F_REQUEST | NLM_F_ACK


class PlugUnavailableError(RuntimeError):
    """The kernel cannot do ``sch_plug`` buffering; use ``--netbuf nfqueue``."""


# --- message builders (pure) ----------------------------------------------------------


def _tc(
    mtype: int,
    flags: int,
    seq: int,
    *,
    ifindex: int,
    parent: int,
    handle: int = 0,
    info: int = 0,
    attrs: list[list[object]],
) -> bytes:
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = ifindex
    msg["handle"] = handle
    msg["parent"] = parent
    msg["info"] = info
    msg["attrs"] = attrs
    return encode(msg, type=mtype, flags=flags, seq=seq)


def _plug_options(action: int, limit: int) -> list[object]:
    # Encoded straight from integers: pyroute2's sched_plug.get_parameters maps only
    # the exact 'TCQ_PLUG_*' strings and silently turns anything else into BUFFER.
    if action not in _PLUG_ACTIONS:
        raise ValueError(f"unknown sch_plug action {action!r}")
    if not 0 <= limit <= 0xFFFFFFFF:
        raise ValueError(f"sch_plug limit out of range: {limit}")
    return ["TCA_OPTIONS", {"action": action, "limit": limit}]


def plug_add_msg(ifindex: int, limit: int, seq: int) -> bytes:
    """``tc qdisc add dev IFINDEX root plug limit LIMIT`` (always an explicit limit)."""
    if limit <= 0:
        raise ValueError("a plug qdisc needs a positive limit (0 drops every packet)")
    return _tc(
        _RTM_NEWQDISC,
        _F_NEW,
        seq,
        ifindex=ifindex,
        parent=_TC_H_ROOT,
        attrs=[["TCA_KIND", "plug"], _plug_options(TCQ_PLUG_LIMIT, limit)],
    )


def plug_change_msg(ifindex: int, action: int, seq: int, limit: int = 0) -> bytes:
    """``tc qdisc change dev IFINDEX root plug ACTION``.

    Args:
        ifindex: the IFB's interface index.
        action: ``TCQ_PLUG_BUFFER``, ``TCQ_PLUG_RELEASE_ONE``,
            ``TCQ_PLUG_RELEASE_INDEFINITE`` or ``TCQ_PLUG_LIMIT``.
        seq: sequence number.
        limit: the new limit in bytes, for ``TCQ_PLUG_LIMIT`` only.
    """
    if action != TCQ_PLUG_LIMIT and limit:
        raise ValueError("limit is only meaningful with TCQ_PLUG_LIMIT")
    return _tc(
        _RTM_NEWQDISC,
        _F_ACK,
        seq,
        ifindex=ifindex,
        parent=_TC_H_ROOT,
        attrs=[["TCA_KIND", "plug"], _plug_options(action, limit)],
    )


def plug_del_msg(ifindex: int, seq: int) -> bytes:
    """``tc qdisc del dev IFINDEX root`` (the IFB's root qdisc)."""
    return _tc(_RTM_DELQDISC, _F_ACK, seq, ifindex=ifindex, parent=_TC_H_ROOT, attrs=[])


def ingress_add_msg(ifindex: int, seq: int) -> bytes:
    """``tc qdisc add dev IFINDEX ingress``, as iproute2 sends it (no options)."""
    return _tc(
        _RTM_NEWQDISC,
        _F_NEW,
        seq,
        ifindex=ifindex,
        parent=_TC_H_INGRESS,
        handle=_INGRESS_HANDLE,
        attrs=[["TCA_KIND", "ingress"]],
    )


def ingress_del_msg(ifindex: int, seq: int) -> bytes:
    """``tc qdisc del dev IFINDEX ingress`` (its filters go with it)."""
    return _tc(
        _RTM_DELQDISC,
        _F_ACK,
        seq,
        ifindex=ifindex,
        parent=_TC_H_INGRESS,
        handle=_INGRESS_HANDLE,
        attrs=[["TCA_KIND", "ingress"]],
    )


def _filter_info(prio: int) -> int:
    return (prio << 16) | socket.htons(ETH_P_ALL)


def redirect_filter_add_msg(
    ifindex: int, ifb_index: int, seq: int, prio: int = FILTER_PRIO
) -> bytes:
    """``tc filter add dev IFINDEX parent ffff: protocol all prio PRIO u32 match u32 0 0
    action mirred egress redirect dev IFB``, attribute order as iproute2 6.1.
    """
    mirred = {
        "attrs": [
            [
                "TCA_MIRRED_PARMS",
                {"action": _TC_ACT_STOLEN, "eaction": _TCA_EGRESS_REDIR, "ifindex": ifb_index},
            ]
        ]
    }
    action = {"attrs": [["TCA_ACT_KIND", "mirred"], ["TCA_ACT_OPTIONS", mirred]]}
    options = {
        "attrs": [
            ["TCA_U32_ACT", {"attrs": [["TCA_ACT_PRIO_1", action]]}],
            # One all-zero key: matches every packet; pyroute2 sets TC_U32_TERMINAL.
            ["TCA_U32_SEL", {"keys": ["0x0/0x0+0"]}],
        ]
    }
    return _tc(
        _RTM_NEWTFILTER,
        _F_NEW,
        seq,
        ifindex=ifindex,
        parent=_INGRESS_HANDLE,
        info=_filter_info(prio),
        attrs=[["TCA_KIND", "u32"], ["TCA_OPTIONS", options]],
    )


def redirect_filter_del_msg(ifindex: int, seq: int, prio: int = FILTER_PRIO) -> bytes:
    """``tc filter del dev IFINDEX parent ffff: protocol all prio PRIO u32``."""
    return _tc(
        _RTM_DELTFILTER,
        _F_ACK,
        seq,
        ifindex=ifindex,
        parent=_INGRESS_HANDLE,
        info=_filter_info(prio),
        attrs=[["TCA_KIND", "u32"]],
    )


def _link(mtype: int, flags: int, seq: int, *, index: int = 0, attrs: list[list[object]]) -> bytes:
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["attrs"] = attrs
    return encode(msg, type=mtype, flags=flags, seq=seq)


def ifb_add_msg(name: str, seq: int) -> bytes:
    """``ip link add NAME type ifb`` (fails with EEXIST if the name is taken).

    ``IFLA_INFO_KIND`` is written without its NUL, as iproute2 does (pyroute2 would
    add one); the kernel takes either, the golden test wants iproute2's bytes.
    """
    if not 0 < len(name.encode()) < 16:
        raise ValueError(f"bad interface name {name!r}")
    head = _link(_RTM_NEWLINK, _F_NEW, seq, attrs=[["IFLA_IFNAME", name]])
    linkinfo = pack_attr(_IFLA_LINKINFO, pack_attr(_IFLA_INFO_KIND, b"ifb"))
    msg = bytearray(head + linkinfo)
    struct.pack_into("=I", msg, 0, len(msg))
    return bytes(msg)


def link_up_msg(ifindex: int, seq: int) -> bytes:
    """``ip link set dev IFINDEX up``."""
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = ifindex
    msg["flags"] = _IFF_UP
    msg["change"] = _IFF_UP
    msg["attrs"] = []
    return encode(msg, type=_RTM_NEWLINK, flags=_F_ACK, seq=seq)


def link_del_msg(ifindex: int, seq: int) -> bytes:
    """``ip link del dev IFINDEX``."""
    return _link(_RTM_DELLINK, _F_ACK, seq, index=ifindex, attrs=[])


def link_get_msg(name: str, seq: int) -> bytes:
    """``ip link show dev NAME``: one RTM_NEWLINK reply, or ENODEV."""
    return _link(_RTM_GETLINK, NLM_F_REQUEST, seq, attrs=[["IFLA_IFNAME", name]])


def link_dump_msg(seq: int) -> bytes:
    """``ip link show``: a multipart dump of every link."""
    return _link(_RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, attrs=[])


# --- link helpers ---------------------------------------------------------------------


async def link_index(sock: NetlinkSocket, name: str) -> int:
    """The interface index of ``name`` in the socket's namespace."""
    replies = await sock.request(link_get_msg(name, 0), what=f"look up interface {name}")
    return int(replies[0].decode(ifinfmsg)["index"])


async def link_names(sock: NetlinkSocket) -> set[str]:
    """Names of every interface in the socket's namespace."""
    replies = await sock.request(link_dump_msg(0), what="list interfaces")
    return {str(r.decode(ifinfmsg).get_attr("IFLA_IFNAME")) for r in replies}


_IFB_NAME = re.compile(r"ifb(\d+)\Z")


@final
class PlugBuffer:
    """Network output buffer on ``sch_plug`` (a :class:`CheckpointDevice`).

    ``commit`` returns 0: ``sch_plug`` does not report how many packets a release
    lets go.
    """

    max_inflight: int = 1

    def __init__(
        self,
        interface: str,
        *,
        ifb: str | None = None,
        limit: int = DEFAULT_LIMIT,
        netns: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Describe the buffer; nothing happens before :meth:`setup`.

        Args:
            interface: the guest's VIF/TAP, whose ingress carries the guest's output.
            ifb: IFB device name to create; default the first free ``ifbN``.
            limit: plug queue limit in bytes (packets beyond it are dropped).
            netns: network namespace of ``interface`` (name or path), if not ours.
            timeout: seconds to wait for each netlink answer.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.interface = interface
        self.name = f"plug:{interface}"
        self.limit = limit
        self.netns = netns
        self.timeout = timeout
        self._want_ifb = ifb
        self.ifb: str | None = None
        self._sock: NetlinkSocket | None = None
        self._if_index = 0
        self._ifb_index = 0
        # What setup created, in creation order, for teardown and rollback.
        self._created: list[str] = []
        self._inflight: int | None = None

    async def _ask(self, msg: bytes, what: str) -> None:
        assert self._sock is not None
        await self._sock.request(msg, timeout=self.timeout, what=what)

    async def setup(self) -> None:
        """Build IFB, ingress redirect and plug; on any failure undo what was built."""
        if self._sock is not None:
            raise RuntimeError(f"{self.name}: already set up")
        self._sock = NetlinkSocket.open(NETLINK_ROUTE, netns=self.netns)
        try:
            await self._setup_steps()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.teardown()
            raise

    async def _setup_steps(self) -> None:
        assert self._sock is not None
        self._if_index = await link_index(self._sock, self.interface)
        await self._create_ifb()
        await self._ask(link_up_msg(self._ifb_index, 0), f"bring {self.ifb} up")
        await self._ask(
            ingress_add_msg(self._if_index, 0), f"add ingress qdisc on {self.interface}"
        )
        self._created.append("ingress")
        await self._ask(
            redirect_filter_add_msg(self._if_index, self._ifb_index, 0),
            f"add u32 match-all redirect filter from {self.interface} to {self.ifb}",
        )
        self._created.append("filter")
        try:
            await self._ask(
                plug_add_msg(self._ifb_index, self.limit, 0), f"add plug qdisc on {self.ifb}"
            )
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                raise PlugUnavailableError(
                    f"{self.name}: this kernel has no sch_plug qdisc (CONFIG_NET_SCH_PLUG): "
                    f"{exc}. Use `--netbuf nfqueue` (NFQUEUE output buffering) instead."
                ) from exc
            raise
        self._created.append("plug")

    async def _create_ifb(self) -> None:
        assert self._sock is not None
        if self._want_ifb is not None:
            candidates: list[str] = [self._want_ifb]
        else:
            taken = {
                int(m.group(1))
                for n in await link_names(self._sock)
                if (m := _IFB_NAME.match(n)) is not None
            }
            free = [n for n in range(1 << 16) if n not in taken]
            candidates = [f"ifb{n}" for n in free[:16]]
        for i, name in enumerate(candidates):
            try:
                await self._ask(ifb_add_msg(name, 0), f"create IFB device {name}")
            except NetlinkError as exc:
                # Someone else took the name in between: try the next free one.
                if exc.errno == errno.EEXIST and i + 1 < len(candidates):
                    continue
                raise
            self.ifb = name
            self._created.append("ifb")
            self._ifb_index = await link_index(self._sock, name)
            return

    async def postsuspend(self, epoch: int) -> None:
        """Close the epoch: TCQ_PLUG_BUFFER (later packets wait for a new release)."""
        if self._inflight is not None:
            raise RuntimeError(
                f"{self.name}: epoch {self._inflight} is not committed yet and sch_plug "
                "holds one closed epoch at most"
            )
        await self._ask(plug_change_msg(self._ifb_index, TCQ_PLUG_BUFFER, 0), "plug block")
        self._inflight = epoch

    async def preresume(self, epoch: int) -> None:
        """Nothing to do: the plug already buffers the next epoch."""

    async def commit(self, epoch: int) -> int:
        """Release the closed epoch: TCQ_PLUG_RELEASE_ONE."""
        if self._inflight != epoch:
            raise RuntimeError(
                f"{self.name}: commit({epoch}) but the closed epoch is {self._inflight}"
            )
        await self._ask(plug_change_msg(self._ifb_index, TCQ_PLUG_RELEASE_ONE, 0), "plug release")
        self._inflight = None
        return 0

    async def release_all(self) -> None:
        """Unprotected from now on: TCQ_PLUG_RELEASE_INDEFINITE."""
        await self._ask(
            plug_change_msg(self._ifb_index, TCQ_PLUG_RELEASE_INDEFINITE, 0),
            "plug release_indefinite",
        )
        self._inflight = None

    async def teardown(self) -> None:
        """Remove what setup created, newest first; keeps going past failures."""
        sock = self._sock
        if sock is None:
            return
        undo: dict[str, tuple[Callable[[], bytes], str]] = {
            "plug": (lambda: plug_del_msg(self._ifb_index, 0), f"delete plug qdisc on {self.ifb}"),
            "filter": (
                lambda: redirect_filter_del_msg(self._if_index, 0),
                f"delete redirect filter on {self.interface}",
            ),
            "ingress": (
                lambda: ingress_del_msg(self._if_index, 0),
                f"delete ingress qdisc on {self.interface}",
            ),
            "ifb": (lambda: link_del_msg(self._ifb_index, 0), f"delete {self.ifb}"),
        }
        first_error: NetlinkError | None = None
        with trio.CancelScope(shield=True):
            for step in reversed(self._created):
                build, what = undo[step]
                try:
                    await sock.request(build(), timeout=self.timeout, what=what)
                except NetlinkError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENODEV):
                        continue  # already gone (e.g. the guest's interface was removed)
                    log.warning("%s: teardown: %s", self.name, exc)
                    first_error = first_error or exc
        self._created.clear()
        self._sock = None
        self._inflight = None
        sock.close()
        if first_error is not None:
            raise first_error
