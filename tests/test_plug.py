"""sch_plug output buffer: golden bytes, and setup on our kernel (which has no plug).

Golden vectors: the plug ones are what iproute2 6.1 sends (seq=1, pid=0,
ifindex=7); the others were captured here with strace from iproute2 6.1
(``tc``/``ip``) with the guest interface at ifindex 7 and the IFB at 9, seq set to 1.
"""

from __future__ import annotations

import errno
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import trio
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from tremus.buffers.netlink import NETLINK_ROUTE, NetlinkError, NetlinkMessage, NetlinkSocket
from tremus.buffers.plug import (
    TCQ_PLUG_BUFFER,
    TCQ_PLUG_LIMIT,
    TCQ_PLUG_RELEASE_INDEFINITE,
    TCQ_PLUG_RELEASE_ONE,
    PlugBuffer,
    PlugUnavailableError,
    ifb_add_msg,
    ingress_add_msg,
    ingress_del_msg,
    link_del_msg,
    link_up_msg,
    plug_add_msg,
    plug_change_msg,
    plug_del_msg,
    redirect_filter_add_msg,
    redirect_filter_del_msg,
)
from tremus.engine.devices import CheckpointDevice
from tremus.testing.topology import require_root

_why_not = require_root()
needs_root = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER = 44, 45
RTMGRP_LINK, RTMGRP_TC = 0x1, 0x8

# iproute2 6.1, verbatim.
PLUG_ADD_LIMIT_10000 = "3c000000240005060100000000000000000000000700000000000000ffffffff0000000009000100706c7567000000000c0002000300000010270000"
PLUG_BLOCK = "3c000000240005000100000000000000000000000700000000000000ffffffff0000000009000100706c7567000000000c0002000000000000000000"
PLUG_RELEASE = "3c000000240005000100000000000000000000000700000000000000ffffffff0000000009000100706c7567000000000c0002000100000000000000"
PLUG_RELEASE_INDEFINITE = "3c000000240005000100000000000000000000000700000000000000ffffffff0000000009000100706c7567000000000c0002000200000000000000"
PLUG_LIMIT_5000 = "3c000000240005000100000000000000000000000700000000000000ffffffff0000000009000100706c7567000000000c0002000300000088130000"

# Captured from iproute2 6.1 on this machine (see module docstring).
IP_LINK_ADD_IFB3 = "38000000100005060100000000000000000000000000000000000000000000000900030069666233000000000c0012000700010069666200"
IP_LINK_SET_9_UP = "2000000010000500010000000000000000000000090000000100000001000000"
IP_LINK_DEL_9 = "2000000011000500010000000000000000000000090000000000000000000000"
TC_QDISC_ADD_INGRESS = "3000000024000506010000000000000000000000070000000000fffff1ffffff000000000c000100696e677265737300"
TC_QDISC_DEL_INGRESS = "3000000025000500010000000000000000000000070000000000fffff1ffffff000000000c000100696e677265737300"
TC_QDISC_DEL_ROOT_9 = "24000000250005000100000000000000000000000900000000000000ffffffff00000000"
# tc filter add dev IF7 parent ffff: protocol all prio 10 u32 match u32 0 0
#    action mirred egress redirect dev IFB9
TC_FILTER_ADD_REDIRECT = "8c0000002c00050601000000000000000000000007000000000000000000ffff00030a0008000100753332006000020038000700340001000b0001006d69727265640000240002802000020000000000000000000400000000000000000000000100000009000000240005000100010000000000000000000000000000000000000000000000000000000000"
TC_FILTER_DEL = (
    "2c0000002d00050001000000000000000000000007000000000000000000ffff00030a000800010075333200"
)


@pytest.mark.parametrize(
    ("built", "golden"),
    [
        (lambda: plug_add_msg(7, 10000, 1), PLUG_ADD_LIMIT_10000),
        (lambda: plug_change_msg(7, TCQ_PLUG_BUFFER, 1), PLUG_BLOCK),
        (lambda: plug_change_msg(7, TCQ_PLUG_RELEASE_ONE, 1), PLUG_RELEASE),
        (lambda: plug_change_msg(7, TCQ_PLUG_RELEASE_INDEFINITE, 1), PLUG_RELEASE_INDEFINITE),
        (lambda: plug_change_msg(7, TCQ_PLUG_LIMIT, 1, limit=5000), PLUG_LIMIT_5000),
    ],
    ids=["add-limit", "block", "release", "release_indefinite", "limit"],
)
def test_plug_messages_match_netlink_md(built, golden: str) -> None:  # type: ignore[no-untyped-def]
    assert built().hex() == golden


@pytest.mark.parametrize(
    ("built", "golden"),
    [
        (lambda: ifb_add_msg("ifb3", 1), IP_LINK_ADD_IFB3),
        (lambda: link_up_msg(9, 1), IP_LINK_SET_9_UP),
        (lambda: link_del_msg(9, 1), IP_LINK_DEL_9),
        (lambda: ingress_add_msg(7, 1), TC_QDISC_ADD_INGRESS),
        (lambda: ingress_del_msg(7, 1), TC_QDISC_DEL_INGRESS),
        (lambda: plug_del_msg(9, 1), TC_QDISC_DEL_ROOT_9),
        (lambda: redirect_filter_add_msg(7, 9, 1), TC_FILTER_ADD_REDIRECT),
        (lambda: redirect_filter_del_msg(7, 1), TC_FILTER_DEL),
    ],
    ids=[
        "ifb-add",
        "link-up",
        "link-del",
        "ingress-add",
        "ingress-del",
        "root-del",
        "filter-add",
        "filter-del",
    ],
)
def test_setup_messages_match_iproute2(built, golden: str) -> None:  # type: ignore[no-untyped-def]
    assert built().hex() == golden


def test_bad_plug_parameters_are_refused_not_reinterpreted() -> None:
    # pyroute2 would silently turn an unknown action into BUFFER and a missing
    # limit into 0 (drop everything); we refuse both.
    with pytest.raises(ValueError, match="unknown sch_plug action"):
        plug_change_msg(7, 4, 1)
    with pytest.raises(ValueError, match="positive limit"):
        plug_add_msg(7, 0, 1)
    with pytest.raises(ValueError, match="only meaningful"):
        plug_change_msg(7, TCQ_PLUG_BUFFER, 1, limit=10)
    with pytest.raises(ValueError):
        PlugBuffer("tg0", limit=0)


def test_plug_buffer_is_a_checkpoint_device() -> None:
    buf = PlugBuffer("tg0")
    assert isinstance(buf, CheckpointDevice)
    assert buf.max_inflight == 1
    assert buf.name == "plug:tg0"


# --- on the kernel ----------------------------------------------------------------------


@pytest.fixture
def guest_netns() -> Iterator[str]:
    """A fresh namespace holding a persistent TAP ``tg0``, as a guest's VIF."""
    name = f"trmtest-plug-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "tuntap", "add", "dev", "tg0", "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "tg0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="session")
def kernel_has_plug() -> bool:
    """Whether ``tc`` can add a plug qdisc (probed in a throwaway namespace)."""
    if _why_not is not None:
        pytest.skip(_why_not)
    name = f"trmtest-probe-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        probe = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "plug",
                "limit",
                "1000",
            ],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    return probe.returncode == 0


@pytest.fixture
def no_plug(kernel_has_plug: bool) -> None:
    if kernel_has_plug:
        pytest.skip("this kernel has sch_plug; the full cycle is tested instead")


@pytest.fixture
def with_plug(kernel_has_plug: bool) -> None:
    if not kernel_has_plug:
        pytest.skip("this kernel has no sch_plug (CONFIG_NET_SCH_PLUG); see the nfqueue buffer")


def _sh(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


def _events(monitor: NetlinkSocket) -> list[NetlinkMessage]:
    out = []
    while True:
        try:
            out.append(monitor.receive_nowait())
        except trio.WouldBlock:
            return out


def _describe(msg: NetlinkMessage) -> tuple[object, ...]:
    if msg.type in (RTM_NEWLINK, RTM_DELLINK):
        link = msg.decode(ifinfmsg)
        return (msg.type, link.get_attr("IFLA_IFNAME"), link["index"])
    tc = msg.decode(tcmsg)
    return (msg.type, tc.get_attr("TCA_KIND"), tc["index"], tc["parent"], tc["info"])


def _filter_redirect_target(msg: NetlinkMessage) -> int:
    """The ifindex a u32 filter notification's mirred action redirects to."""
    tc = msg.decode(tcmsg)
    acts = tc.get_attr("TCA_OPTIONS").get_attr("TCA_U32_ACT")
    act = acts.get_attr("TCA_ACT_PRIO_1")
    assert act.get_attr("TCA_ACT_KIND") == "mirred"
    parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
    assert parms["eaction"] == 1  # egress redirect
    return int(parms["ifindex"])


@needs_root
async def test_setup_without_sch_plug_fails_clearly_after_every_other_step(
    guest_netns: str, no_plug: None
) -> None:
    """Every step before the plug qdisc succeeds, then a clear error and a clean slate.

    A monitor socket in the namespace records the kernel's own notifications of
    each object created and removed.
    """
    tap_index = int(_sh(guest_netns, "cat", "/sys/class/net/tg0/ifindex"))
    buf = PlugBuffer("tg0", netns=guest_netns)
    with NetlinkSocket.open(
        NETLINK_ROUTE, netns=guest_netns, groups=RTMGRP_LINK | RTMGRP_TC, keep_unsolicited=True
    ) as monitor:
        with trio.fail_after(4):
            with pytest.raises(PlugUnavailableError) as info:
                await buf.setup()
            await trio.sleep(0.05)
        events = _events(monitor)

    error = info.value
    text = str(error)
    assert "--netbuf nfqueue" in text
    assert "Specified qdisc kind is unknown" in text
    assert isinstance(error.__cause__, NetlinkError)
    assert error.__cause__.errno == errno.ENOENT

    created = [
        _describe(e) for e in events if e.type in (RTM_NEWLINK, RTM_NEWQDISC, RTM_NEWTFILTER)
    ]
    removed = [
        _describe(e) for e in events if e.type in (RTM_DELLINK, RTM_DELQDISC, RTM_DELTFILTER)
    ]
    ifbs = [d for d in created if d[0] == RTM_NEWLINK and d[1] == "ifb0"]
    assert ifbs, f"no IFB created: {created}"
    ifb_index = ifbs[0][2]
    ingress = (RTM_NEWQDISC, "ingress", tap_index, 0xFFFFFFF1)
    assert any(d[:4] == ingress for d in created), created
    # The filter: u32 on the TAP's ingress, ETH_P_ALL (htons(3) = 0x0300), prio 10.
    filters = [e for e in events if e.type == RTM_NEWTFILTER]
    assert filters and all(
        _describe(f)[1:] == ("u32", tap_index, 0xFFFF0000, (10 << 16) | 0x0300) for f in filters
    )
    assert _filter_redirect_target(filters[-1]) == ifb_index
    # ... and rolled back, newest first.
    assert any(d[0] == RTM_DELTFILTER for d in removed)
    assert any(d[:4] == (RTM_DELQDISC, "ingress", tap_index, 0xFFFFFFF1) for d in removed)
    assert any(d[:2] == (RTM_DELLINK, "ifb0") for d in removed)

    # Nothing left behind, as the usual tools see it.
    assert "ingress" not in _sh(guest_netns, "tc", "qdisc", "show", "dev", "tg0")
    assert _sh(guest_netns, "tc", "filter", "show", "dev", "tg0", "ingress").strip() == ""
    links = _sh(guest_netns, "ip", "-o", "link", "show")
    assert "ifb" not in links and "tg0" in links
    # And the device can be set up again (same outcome, no EEXIST from leftovers).
    with pytest.raises(PlugUnavailableError):
        await buf.setup()


@needs_root
async def test_existing_ingress_qdisc_is_not_taken_over(guest_netns: str) -> None:
    _sh(guest_netns, "tc", "qdisc", "add", "dev", "tg0", "ingress")
    buf = PlugBuffer("tg0", ifb="ifbx", netns=guest_netns)
    with trio.fail_after(4):
        with pytest.raises(NetlinkError) as info:
            await buf.setup()
    assert info.value.errno == errno.EEXIST
    assert "add ingress qdisc on tg0" in str(info.value)
    # The IFB it created is gone; the ingress qdisc that was there stays.
    assert "ifbx" not in _sh(guest_netns, "ip", "-o", "link", "show")
    assert "ingress" in _sh(guest_netns, "tc", "qdisc", "show", "dev", "tg0")


@needs_root
async def test_missing_interface_is_reported_by_name(guest_netns: str) -> None:
    buf = PlugBuffer("nosuch0", netns=guest_netns)
    with trio.fail_after(4):
        with pytest.raises(NetlinkError, match="look up interface nosuch0") as info:
            await buf.setup()
    assert info.value.errno == errno.ENODEV
    assert "ifb" not in _sh(guest_netns, "ip", "-o", "link", "show")


@needs_root
async def test_plug_full_cycle_when_available(guest_netns: str, with_plug: None) -> None:
    """On kernels with sch_plug: the whole cycle. Skipped on ours."""
    buf = PlugBuffer("tg0", netns=guest_netns)
    with trio.fail_after(4):
        await buf.setup()
        try:
            assert "plug" in _sh(guest_netns, "tc", "qdisc", "show", "dev", str(buf.ifb))
            await buf.postsuspend(1)
            with pytest.raises(RuntimeError):
                await buf.postsuspend(2)
            assert await buf.commit(1) == 0
            await buf.release_all()
        finally:
            await buf.teardown()
    assert "ifb" not in _sh(guest_netns, "ip", "-o", "link", "show")
    assert "ingress" not in _sh(guest_netns, "tc", "qdisc", "show", "dev", "tg0")
