"""NFQUEUE output buffer: messages, and frames really held and released.

The kernel-facing tests build a Topology (client, primary): a guest TAP ``tg0`` is
bridged in ``primary``; frames written into it are addressed to the client, whose
UDP socket shows what got out. Skipped without root or iptables.
"""

from __future__ import annotations

import shutil
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tremus.buffers.netlink import NetlinkMessage, pack_attr, pack_header
from tremus.buffers.nfqueue import (
    NFQNL_MSG_PACKET,
    NfqPacket,
    NfqueueBuffer,
    NfqueueSetupError,
    id_after,
    nfq_bind_msg,
    nfq_params_msg,
    nfq_unbind_msg,
    nfq_verdict_batch_msg,
    parse_packet,
)
from tremus.engine.devices import CheckpointDevice, DeviceRunner
from tremus.testing.topology import Tap, Topology, require_root, udp_frame

_why_not = require_root() or (None if shutil.which("iptables") else "needs iptables")
needs_root = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")

GUEST_MAC = bytes.fromhex("02aa00000001")
PORT = 9999
QUEUE = 5


# --- messages (pure) --------------------------------------------------------------------


def test_bind_and_params_follow_netlink_md_layout() -> None:
    bind = nfq_bind_msg(5, 1)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", bind)
    assert (length, mtype, flags, seq, pid) == (len(bind), 0x0302, 0x5, 1, 0)
    # nfgenmsg: AF_UNSPEC, version 0, be16 queue number
    assert bind[16:20] == bytes([0, 0, 0, 5])
    # NFQA_CFG_CMD (1): {u8 cmd BIND=1, pad, be16 pf}
    assert bind[20:] == struct.pack("=HH", 8, 1) + bytes([1, 0]) + struct.pack("!H", 2)
    assert nfq_unbind_msg(5, 1)[24] == 2

    params = nfq_params_msg(5, 1)
    # NFQA_CFG_PARAMS (2), nla_len 9: be32 copy_range 0, u8 mode META=1, then padding
    assert params[20:24] == struct.pack("=HH", 9, 2)
    assert params[24:29] == b"\0\0\0\0\x01"
    assert len(params) == 32


def test_verdict_batch_layout() -> None:
    msg = nfq_verdict_batch_msg(5, 0x01020304, 9)
    _, mtype, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (mtype, flags, seq) == (0x0303, 0x5, 9)
    assert msg[16:20] == bytes([0, 0, 0, 5])
    # NFQA_VERDICT_HDR (2): be32 verdict NF_ACCEPT=1, be32 id
    assert msg[20:] == struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 0x01020304)
    assert struct.unpack_from("=H", nfq_verdict_batch_msg(5, 1, 1, ack=False), 6)[0] == 0x1


def test_parse_packet() -> None:
    body = bytes([2, 0]) + struct.pack("!H", 5) + pack_attr(1, struct.pack("!IHB", 77, 0x0800, 2))
    data = pack_header(16 + len(body), NFQNL_MSG_PACKET, 0, 0, 0) + body
    msg = NetlinkMessage(NFQNL_MSG_PACKET, 0, 0, 0, data)
    assert parse_packet(msg) == NfqPacket(queue_num=5, packet_id=77, hw_protocol=0x0800, hook=2)
    assert parse_packet(NetlinkMessage(2, 0, 0, 0, pack_header(20, 2, 0, 0) + b"\0" * 4)) is None


@settings(deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 2**31 - 1))
def test_id_after_is_wrap_safe(base: int, step: int) -> None:
    later = (base + step) % 2**32
    assert id_after(later, base)
    assert not id_after(base, later)
    assert not id_after(base, base)


def test_nfqueue_buffer_is_a_checkpoint_device() -> None:
    buf = NfqueueBuffer("tg0", 5)
    assert isinstance(buf, CheckpointDevice)
    assert buf.max_inflight > 1
    with pytest.raises(ValueError):
        NfqueueBuffer("tg0", 70000)


async def test_setup_outside_async_with_is_refused() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await NfqueueBuffer("tg0", 5).setup()


# --- frames through a real bridge -------------------------------------------------------


@dataclass
class Wire:
    """A guest TAP on ``primary`` and a UDP socket on ``client``."""

    topo: Topology
    tap: Tap
    rx: trio.socket.SocketType

    @property
    def netns(self) -> str:
        return self.topo.netns("primary")

    def send(self, payload: bytes) -> None:
        self.tap.write(
            udp_frame(
                src_mac=GUEST_MAC,
                dst_mac=self.topo.mac("client"),
                src_ip=self.topo.guest_address(),
                dst_ip=self.topo.address("client"),
                src_port=4000,
                dst_port=PORT,
                payload=payload,
            )
        )

    async def expect(self, *payloads: bytes) -> None:
        with trio.fail_after(10):
            got = [await self.rx.recv(2048) for _ in payloads]
        assert got == list(payloads)

    async def expect_nothing(self, seconds: float = 0.25) -> None:
        with trio.move_on_after(seconds):
            leaked = await self.rx.recv(2048)
            pytest.fail(f"frame got out while held: {leaked!r}")

    def rules(self, binary: str = "iptables") -> str:
        return self.topo.run("primary", [binary, "-S", "FORWARD"]).stdout


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    if _why_not is not None:
        pytest.skip(_why_not)
    async with Topology(("client", "primary")) as topo:
        topo.add_tap("primary", "tg0")
        tap = await trio.to_thread.run_sync(topo.open_tap, "primary", "tg0")
        with tap, topo.socket("client") as raw:
            rx = trio.socket.from_stdlib_socket(raw)
            await rx.bind((topo.address("client"), PORT))
            yield Wire(topo, tap, rx)


async def wait_seen(buf: NfqueueBuffer, count: int) -> None:
    """Until the buffer has been told about ``count`` packets (they are queued)."""
    with trio.fail_after(10):
        while buf.seen < count:
            await trio.sleep(0.005)


@needs_root
async def test_frame_is_held_until_commit(wire: Wire) -> None:
    wire.send(b"before")  # no buffer yet: passes straight through
    await wire.expect(b"before")
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as buf:
        await buf.setup()
        assert "--physdev-in tg0 -j NFQUEUE --queue-num 5" in wire.rules()
        assert "bypass" not in wire.rules()
        wire.send(b"held")
        await wait_seen(buf, 1)
        await wire.expect_nothing()
        await buf.postsuspend(1)
        await buf.preresume(1)
        await wire.expect_nothing(0.05)
        assert await buf.commit(1) == 1
        await wire.expect(b"held")
        await buf.teardown()
    assert "NFQUEUE" not in wire.rules()


@needs_root
async def test_epochs_in_flight_are_released_in_order(wire: Wire) -> None:
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as buf:
        runner = DeviceRunner([buf])
        await runner.setup()
        wire.send(b"e1-a")
        await wait_seen(buf, 1)
        await runner.postsuspend(1)
        wire.send(b"e2-a")
        wire.send(b"e2-b")
        await wait_seen(buf, 3)
        await runner.postsuspend(2)
        await runner.postsuspend(3)  # an epoch without output
        wire.send(b"e4-a")
        await wait_seen(buf, 4)
        await runner.postsuspend(4)
        wire.send(b"open")  # the running epoch: stays held
        await wait_seen(buf, 5)
        await wire.expect_nothing(0.1)

        assert await runner.commit(1) == 1
        await wire.expect(b"e1-a")
        await wire.expect_nothing(0.1)
        assert await runner.commit(2) == 2
        await wire.expect(b"e2-a", b"e2-b")
        assert await runner.commit(3) == 0
        assert await runner.commit(4) == 1
        await wire.expect(b"e4-a")
        await wire.expect_nothing(0.1)
        with pytest.raises(ValueError):
            await buf.commit(4)  # already released
        await runner.teardown()
    # Tearing down dropped the held frame of the running epoch: never fail open.
    await wire.expect_nothing(0.1)


@needs_root
async def test_release_all_lets_everything_through(wire: Wire) -> None:
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as buf:
        await buf.setup()
        wire.send(b"closed")
        await wait_seen(buf, 1)
        await buf.postsuspend(1)
        wire.send(b"open")
        await wait_seen(buf, 2)
        await wire.expect_nothing(0.1)
        await buf.release_all()
        await wire.expect(b"closed", b"open")
        # Pass-through: new frames go out without any commit.
        for i in range(5):
            wire.send(b"free%d" % i)
        await wire.expect(*(b"free%d" % i for i in range(5)))
        assert buf.released == buf.seen == 7
    assert "NFQUEUE" not in wire.rules()


@needs_root
async def test_teardown_removes_rules_even_after_errors(wire: Wire) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as buf:
            await buf.setup()
            assert "NFQUEUE" in wire.rules()
            if shutil.which("ip6tables"):
                assert "--physdev-in tg0 -j NFQUEUE --queue-num 5" in wire.rules("ip6tables")
            raise RuntimeError("boom")
    assert "NFQUEUE" not in wire.rules()
    if shutil.which("ip6tables"):
        assert "NFQUEUE" not in wire.rules("ip6tables")
    # Frames flow unbuffered again, and the queue number is free for a new binding.
    wire.send(b"after")
    await wire.expect(b"after")
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as again:
        await again.setup()


@needs_root
async def test_rule_left_by_a_killed_primary_is_taken_over(wire: Wire) -> None:
    # What a SIGKILLed primary leaves: its rule, fail-closed, with nothing bound.
    rule = ["FORWARD", "-m", "physdev", "--physdev-in", "tg0", "-j", "NFQUEUE",
            "--queue-num", str(QUEUE)]
    wire.topo.run("primary", ["iptables", "-w", "-I", *rule])
    wire.send(b"dropped")
    await wire.expect_nothing()
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as buf:
        await buf.setup()
        assert wire.rules().count("NFQUEUE") == 1
        await buf.release_all()
        await buf.teardown()
    assert "NFQUEUE" not in wire.rules()
    wire.send(b"flows")
    await wire.expect(b"flows")


@needs_root
async def test_queue_bound_elsewhere_fails_clearly_and_leaves_nothing(wire: Wire) -> None:
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as first:
        await first.setup()
        async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns) as second:
            with pytest.raises(NfqueueSetupError, match="already bound"):
                await second.setup()
        # Only the first buffer's rule is there, and it still holds and releases.
        assert wire.rules().count("NFQUEUE") == 1
        wire.send(b"x")
        await wait_seen(first, 1)
        await first.postsuspend(1)
        assert await first.commit(1) == 1
        await wire.expect(b"x")


@needs_root
async def test_ipv6_is_steered_too(wire: Wire) -> None:
    if not shutil.which("ip6tables"):
        pytest.skip("ip6tables not installed")
    frame = _udp6_frame(wire.topo.mac("client"))
    async with NfqueueBuffer("tg0", QUEUE, netns=wire.netns, ipv6=True) as buf:
        await buf.setup()
        wire.tap.write(frame)
        await wait_seen(buf, 1)
        await buf.postsuspend(1)
        assert await buf.commit(1) == 1


def _udp6_frame(dst_mac: bytes) -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "fd77::100")
    dst = socket.inet_pton(socket.AF_INET6, "fd77::1")
    udp = struct.pack("!HHHH", 4000, PORT, 12, 0) + b"six!"
    ip6 = struct.pack("!IHBB", 6 << 28, len(udp), socket.IPPROTO_UDP, 64) + src + dst
    return dst_mac + GUEST_MAC + struct.pack("!H", 0x86DD) + ip6 + udp
