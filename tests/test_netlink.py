"""The Trio netlink socket: framing, errors, dumps, ACKs, unsolicited messages.

Kernel-facing tests run in a fresh network namespace each (real netlink, no mocks)
and are skipped without root.
"""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from tremus.buffers.netlink import (
    NETLINK_ROUTE,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    call_in_netns,
    iter_attrs,
    pack_attr,
    pack_header,
    parse_messages,
)
from tremus.buffers.plug import (
    link_del_msg,
    link_dump_msg,
    link_get_msg,
    link_up_msg,
    plug_add_msg,
)
from tremus.testing.topology import require_root

_why_not = require_root()
needs_root = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")
RTMGRP_LINK = 0x1


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (only ``lo``)."""
    name = f"trmtest-nl-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# --- framing (pure) -------------------------------------------------------------------


def test_parse_messages_splits_a_datagram_and_stops_at_garbage() -> None:
    one = pack_header(20, 100, 0, 7, 0) + b"abcd"
    two = pack_header(17, 101, 2, 8, 5) + b"x" + b"\0\0\0"  # padded to 4
    msgs = parse_messages(one + two + b"\xff" * 10)
    assert [(m.type, m.seq, m.pid) for m in msgs] == [(100, 7, 0), (101, 8, 5)]
    assert msgs[0].payload == b"abcd"
    assert msgs[1].payload == b"x"
    # A length beyond the buffer is not trusted.
    assert parse_messages(pack_header(400, 1, 0, 1, 0)) == []


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=40)), max_size=8))
def test_attrs_round_trip(attrs: list[tuple[int, bytes]]) -> None:
    buf = b"".join(pack_attr(t, p) for t, p in attrs)
    assert len(buf) % 4 == 0
    assert list(iter_attrs(buf)) == attrs


def test_netlink_error_message_names_request_and_reason() -> None:
    exc = NetlinkError(errno.ENOENT, "add plug qdisc on ifb0", "Specified qdisc kind is unknown")
    assert exc.errno == errno.ENOENT
    assert str(exc) == "add plug qdisc on ifb0: Specified qdisc kind is unknown (ENOENT)"
    assert isinstance(exc, OSError)
    plain = NetlinkError(errno.ENODEV, "delete link 9")
    assert "No such device" in str(plain) and "ENODEV" in str(plain)


# --- against the kernel -----------------------------------------------------------------


@needs_root
async def test_unknown_qdisc_kind_is_a_clear_error(netns: str) -> None:
    with NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as sock:
        lo = await _index(sock, "lo")
        with pytest.raises(NetlinkError) as info:
            await sock.request(plug_add_msg(lo, 10000, 0), what="add plug qdisc on lo")
    # On kernels with sch_plug this would succeed; this one has none.
    assert info.value.errno == errno.ENOENT
    assert "Specified qdisc kind is unknown" in str(info.value)
    assert str(info.value).startswith("add plug qdisc on lo: ")


@needs_root
async def test_deleting_a_missing_link_maps_errno(netns: str) -> None:
    with NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as sock:
        with pytest.raises(NetlinkError) as info:
            await sock.request(link_del_msg(4242, 0), what="delete link 4242")
        assert info.value.errno == errno.ENODEV
        assert str(info.value).startswith("delete link 4242: ")
        assert "ENODEV" in str(info.value)
        # The socket is still usable after an error.
        assert await _index(sock, "lo") == 1


@needs_root
async def test_dump_is_multipart_and_namespaced(netns: str) -> None:
    subprocess.run(
        ["ip", "-n", netns, "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=True
    )
    with NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as sock:
        replies = await sock.request(link_dump_msg(0))
    names = {r.decode(ifinfmsg).get_attr("IFLA_IFNAME") for r in replies}
    assert names == {"lo", "va", "vb"}


@needs_root
async def test_ack_request_returns_no_replies_and_sequence_numbers_advance(netns: str) -> None:
    with NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as sock:
        assert await sock.request(link_up_msg(1, 0)) == []
        first = sock.next_seq()
        await sock.request(link_up_msg(1, 0))
        assert sock.next_seq() == first + 2
    flags = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", "lo"], capture_output=True, text=True
    ).stdout
    assert ",UP" in flags


@needs_root
async def test_request_without_answer_times_out_clearly(netns: str) -> None:
    # RTM_NEWLINK without NLM_F_ACK: the kernel answers nothing when it succeeds.
    msg = bytearray(link_up_msg(1, 0))
    struct.pack_into("=H", msg, 6, NLM_F_REQUEST)
    with NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as sock:
        with trio.fail_after(3):
            with pytest.raises(NetlinkError) as info:
                await sock.request(bytes(msg), timeout=0.2, what="bring lo up")
    assert info.value.errno == errno.ETIMEDOUT
    assert "bring lo up: no complete answer within 0.2 s" in str(info.value)


@needs_root
async def test_concurrent_requests_and_receive_share_one_socket(netns: str) -> None:
    """A task blocked in receive() must not starve requests, and the other way round."""
    with (
        NetlinkSocket.open(
            NETLINK_ROUTE, netns=netns, groups=RTMGRP_LINK, keep_unsolicited=True
        ) as monitor,
        NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as actor,
    ):
        seen: list[int] = []

        async def watch() -> None:
            while True:
                msg = await monitor.receive()
                seen.append(msg.type)

        with trio.fail_after(3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await trio.testing.wait_all_tasks_blocked()

                async def lookup(i: int) -> None:
                    replies = await monitor.request(link_get_msg("lo", 0))
                    assert replies[0].decode(ifinfmsg)["index"] == 1

                async with trio.open_nursery() as inner:
                    for i in range(20):
                        inner.start_soon(lookup, i)
                # Replies to our own requests were not taken for notifications.
                assert seen == []
                await actor.request(link_up_msg(1, 0))
                while 16 not in seen:  # RTM_NEWLINK notification
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()


@needs_root
async def test_socket_opened_in_netns_sees_only_that_namespace(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "link", "add", "only-here", "type", "veth"], check=True)
    with NetlinkSocket.open(NETLINK_ROUTE, netns=netns) as sock:
        replies = await sock.request(link_get_msg("only-here", 0))
        assert replies[0].decode(ifinfmsg).get_attr("IFLA_IFNAME") == "only-here"
    with NetlinkSocket.open(NETLINK_ROUTE) as root:
        with pytest.raises(NetlinkError) as info:
            await root.request(link_get_msg("only-here", 0))
        assert info.value.errno == errno.ENODEV
    # The calling thread is untouched by call_in_netns.
    own = call_in_netns(netns, lambda: socket.if_nameindex())
    assert {n for _, n in own} >= {"lo", "only-here"}
    assert "only-here" not in {n for _, n in socket.if_nameindex()}


@needs_root
async def test_closed_socket_wakes_waiters(netns: str) -> None:
    sock = NetlinkSocket.open(NETLINK_ROUTE, netns=netns, keep_unsolicited=True)
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await sock.receive()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            sock.close()


async def _index(sock: NetlinkSocket, name: str) -> int:
    replies = await sock.request(link_get_msg(name, 0))
    return int(replies[0].decode(ifinfmsg)["index"])
