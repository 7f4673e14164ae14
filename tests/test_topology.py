"""The namespace test topology: isolation, bridging, cleanup."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import uuid

import pytest
import trio

from tremus.testing.topology import (
    DEFAULT_PREFIX,
    Topology,
    cleanup_stale,
    require_root,
    udp_frame,
)

_why_not = require_root()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hosts_reach_each_other_and_nothing_else() -> None:
    with Topology(("client", "backup")) as topo:
        assert {topo.netns("client"), topo.netns("backup"), topo.segment} <= _namespaces()
        with topo.socket("backup") as rx, topo.socket("client") as tx:
            rx.bind((topo.address("backup"), 7000))
            rx.settimeout(2)
            tx.sendto(b"ping", (topo.address("backup"), 7000))
            assert rx.recvfrom(100) == (b"ping", (topo.address("client"), tx.getsockname()[1]))
            # No route out of the segment.
            with pytest.raises(OSError) as info:
                tx.sendto(b"x", ("192.0.2.1", 9))
            assert info.value.errno == errno.ENETUNREACH
        routes = topo.run("client", ["ip", "route", "show"]).stdout
        assert "default" not in routes
        assert "10.77.0.0/24" in routes
        assert topo.run("client", ["ip", "-o", "link", "show", "lo"]).stdout.count("UP") >= 1
    assert not ({topo.netns("client"), topo.netns("backup"), topo.segment} & _namespaces())


def test_two_topologies_side_by_side_do_not_clash() -> None:
    with Topology(("a", "b")) as one, Topology(("a", "b")) as two:
        assert one.prefix != two.prefix
        assert one.address("a") == two.address("a")  # separate segments
        with one.socket("b") as rx, two.socket("a") as tx:
            rx.bind((one.address("b"), 7001))
            rx.settimeout(0.2)
            tx.sendto(b"wrong segment", (two.address("b"), 7001))
            with pytest.raises(TimeoutError):
                rx.recvfrom(100)


async def test_tap_is_bridged_to_the_segment() -> None:
    async with Topology(("client", "primary")) as topo:
        topo.add_tap("primary", "tg0")
        topo.add_tap("primary", "tg1")
        assert topo.l3_interface("primary") == "br0"
        ports = topo.run("primary", ["ip", "-o", "link", "show", "master", "br0"]).stdout
        assert all(name in ports for name in ("eth0", "tg0", "tg1"))
        # The host keeps its address (now on br0) and reaches the client.
        with topo.socket("client") as rx_raw, topo.socket("primary") as tx:
            rx = trio.socket.from_stdlib_socket(rx_raw)
            await rx.bind((topo.address("client"), 7002))
            tx.sendto(b"host", (topo.address("client"), 7002))
            with trio.fail_after(10):
                assert await rx.recv(100) == b"host"
            tap = await trio.to_thread.run_sync(topo.open_tap, "primary", "tg0")
            with tap:
                tap.write(
                    udp_frame(
                        src_mac=bytes.fromhex("02aa00000002"),
                        dst_mac=topo.mac("client"),
                        src_ip=topo.guest_address(1),
                        dst_ip=topo.address("client"),
                        src_port=1,
                        dst_port=7002,
                        payload=b"guest",
                    )
                )
                with trio.fail_after(10):
                    assert await rx.recv(100) == b"guest"


def test_cleanup_on_failure_and_of_stale_leftovers() -> None:
    topo = Topology(("client",))
    with pytest.raises(ZeroDivisionError):
        with topo:
            assert topo.netns("client") in _namespaces()
            1 / 0  # noqa: B018
    assert topo.netns("client") not in _namespaces()

    # A leftover of a process that no longer exists (pid beyond pid_max), next to
    # one of a live process (ours). A private prefix keeps parallel runs apart.
    prefix = f"trmstale{uuid.uuid4().hex[:8]}"
    stale = f"{prefix}99999999x0-seg"
    live = f"{prefix}{os.getpid()}x0-seg"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert cleanup_stale(prefix) == [stale]
        assert stale not in _namespaces()
        assert live in _namespaces()
        assert cleanup_stale(prefix, include_live=True) == [live]
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert Topology(("h",)).prefix.startswith(f"{DEFAULT_PREFIX}{os.getpid()}x")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Topology(("a", "a"))
    with pytest.raises(ValueError):
        Topology(("bad name",))
    topo = Topology(("a",))
    with pytest.raises(KeyError):
        topo.netns("nope")
    with pytest.raises(KeyError):
        topo.open_tap("a", "tg9")


def test_socket_lives_in_the_host_namespace() -> None:
    with Topology(("client",)) as topo, topo.socket("client") as sock:
        sock.bind((topo.address("client"), 0))  # that address exists only there
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as here:
            with pytest.raises(OSError):
                here.bind((topo.address("client"), 0))
