"""Output commit, end to end: a client never sees a reply before its epoch is acked.

Three real hosts in namespaces (``tests/_netharness.py``): ``tremus backup`` on one,
``tremus protect`` of the kv guest on another, and a UDP client in the test process
on the third. The client's clock (``time.time()``) is the clock of the primary's JSON
events, so every reply can be placed against the epochs: a request sent at ``t0`` is
answered, at the earliest, in the epoch whose checkpoint is the first one sent after
``t0``; its reply must not reach the client before the primary got that epoch's ACK
(the ``time`` of ``checkpoint_acked``, stamped when the ACK arrives, before commit).
"""

from __future__ import annotations

import shutil
import statistics

import pytest
import trio

from tests._microvm_util import needs_kvm
from tests._netharness import Exchange, KvNet, NsProcess, kv_net, run_in
from tremus.testing.topology import require_root

_why_not = require_root() or (None if shutil.which("iptables") else "needs iptables")
pytestmark = [needs_kvm, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

INTERVAL_MS = 200
REQUESTS = 15


def requests() -> list[str]:
    out = []
    for i in range(REQUESTS):
        out.append(f"SET key{i // 2} value{i // 2}" if i % 2 == 0 else f"GET key{i // 2}")
    return out


def expected(request: str) -> str:
    verb, key, *_ = request.split()
    return f"OK {key}" if verb == "SET" else f"VAL {key} value{key[3:]}"


async def converse(net: KvNet, interval_ms: float) -> list[Exchange]:
    """One request at a time; before each, a pause that spreads the requests over the
    phases of an epoch (the client is in step with the commits through the replies)."""
    out = []
    for i, request in enumerate(requests()):
        await trio.sleep(interval_ms / 1000 * 0.8 * ((i * 7) % REQUESTS) / REQUESTS)
        exchange = await net.ask(request)
        assert exchange.reply == expected(request), exchange
        out.append(exchange)
    return out


async def protected_exchanges(net: KvNet, netbuf: str, *extra: str
                              ) -> tuple[list[Exchange], NsProcess]:
    await net.start_backup()
    primary = await net.start_primary(netbuf, INTERVAL_MS, *extra)
    exchanges = await converse(net, INTERVAL_MS)
    return exchanges, primary


def first_epoch_sent_after(primary: NsProcess, t0: float) -> int | None:
    for sent in primary.of("checkpoint_sent"):
        if sent["time"] > t0:
            return int(sent["epoch"])
    return None


@pytest.mark.parametrize("netbuf", ["vmm", "nfqueue"])
async def test_replies_wait_for_the_ack_of_their_epoch(netbuf: str) -> None:
    with trio.fail_after(120):
        async with kv_net() as net:
            exchanges, primary = await protected_exchanges(net, netbuf)
            last_t0 = exchanges[-1].t0
            await primary.wait_for(lambda p: first_epoch_sent_after(p, last_t0) is not None,
                                   what="a checkpoint after the last request")
            last_epoch = first_epoch_sent_after(primary, last_t0)
            await primary.wait_for(
                lambda p: any(a["epoch"] >= last_epoch for a in p.of("checkpoint_acked")),
                what=f"the ack of epoch {last_epoch}")
            assert not primary.of("backup_lost"), primary.of("backup_lost")
            acked = {a["epoch"]: a["time"] for a in primary.of("checkpoint_acked")}
            for exchange in exchanges:
                epoch = first_epoch_sent_after(primary, exchange.t0)
                assert epoch is not None and epoch in acked, (exchange, epoch)
                # The reply was produced in `epoch` at the earliest, and left after its ACK.
                assert exchange.t1 >= acked[epoch], (
                    f"{exchange.request!r}: reply {1000 * (acked[epoch] - exchange.t1):.2f} ms "
                    f"before the ack of epoch {epoch}")
            # The event follows the release: the last reply can reach the client first.
            await primary.wait_for(
                lambda p: sum(r["packets"] for r in p.of("output_released")) >= len(exchanges),
                what=f"output_released for all {len(exchanges)} replies")
            protected = statistics.median(e.rtt_ms for e in exchanges)
        # The same conversation with the output let out at once (on fresh hosts: a
        # SIGKILLed nfqueue primary leaves its rule behind, and the rule fails closed).
        async with kv_net() as net:
            unsafe_exchanges, unsafe_primary = await protected_exchanges(
                net, "none", "--unsafe")
            assert not unsafe_primary.of("output_released")
            unsafe = statistics.median(e.rtt_ms for e in unsafe_exchanges)
        assert protected > unsafe + 0.25 * INTERVAL_MS, (protected, unsafe)


async def test_netbuf_none_without_unsafe_is_refused() -> None:
    async with kv_net() as net:
        await net.start_backup()
        result = await run_in(net.topo, "primary", "protect", "--domain", net.domain_spec(),
                              "--backup", net.backup_address, "--netbuf", "none", "--json")
        err = result.stderr.decode()
        assert result.returncode != 0
        assert err.count("\n") == 1 and err.startswith("tremus: error: "), err
        assert "--unsafe" in err and "Traceback" not in err


async def test_netbuf_plug_names_nfqueue_on_this_kernel() -> None:
    async with kv_net() as net:
        await net.start_backup()
        result = await run_in(net.topo, "primary", "protect", "--domain", net.domain_spec(),
                              "--backup", net.backup_address, "--netbuf", "plug", "--json")
        err = result.stderr.decode()
        if result.returncode == 0:
            pytest.skip("this kernel has sch_plug")
        assert err.count("\n") == 1 and err.startswith("tremus: error: "), err
        assert "sch_plug" in err and "--netbuf nfqueue" in err and "Traceback" not in err
        # Nothing left on the primary host: no IFB, no redirect, no plug.
        links = net.topo.run("primary", ["ip", "-o", "link", "show"]).stdout
        assert "ifb" not in links, links
        qdiscs = net.topo.run("primary", ["tc", "qdisc", "show"]).stdout
        assert "ingress" not in qdiscs and "plug" not in qdiscs, qdiscs


@pytest.mark.parametrize("netbuf", ["vmm", "nfqueue"])
async def test_output_triggered_checkpoints_answer_without_the_wait(netbuf: str) -> None:
    """With --output-triggered a held reply starts the next checkpoint at once: the
    round trip is the guest's own time plus the pause and the checkpoint's round trip,
    not half the 200 ms interval — and still no reply leaves before its epoch's ACK."""
    with trio.fail_after(120):
        async with kv_net() as net:
            exchanges, primary = await protected_exchanges(net, netbuf, "--output-triggered")
            started = primary.of("protection_started")[0]
            assert started["output_triggered"] and started["min_interval_ms"] == 2
            for exchange in exchanges:
                epoch = await primary.wait_for(
                    lambda p, t0=exchange.t0: first_epoch_sent_after(p, t0),
                    what="a checkpoint after the request")
                await primary.wait_for(lambda p, e=epoch: any(
                    a["epoch"] >= e for a in p.of("checkpoint_acked")), what="ack")
                acked = {a["epoch"]: a for a in primary.of("checkpoint_acked")}
                assert exchange.t1 >= acked[epoch]["time"], (exchange, epoch)
            rtt = statistics.median(e.rtt_ms for e in exchanges)
            pause_ms = statistics.median(a["pause_us"] for a in acked.values()) / 1000
            round_trip = statistics.median(a["round_trip_ms"] for a in acked.values())
        async with kv_net() as net:
            unsafe, _ = await protected_exchanges(net, "none", "--unsafe")
            guest = statistics.median(e.rtt_ms for e in unsafe)
        print(f"output-triggered {netbuf}: rtt {rtt:.2f} ms; guest {guest:.2f} + pause "
              f"{pause_ms:.2f} + checkpoint round trip {round_trip:.2f} ms")
        # The guest's own time (the unprotected round trip), the pause, the
        # checkpoint's round trip, 1 ms; and a margin for the kick of a running vCPU.
        assert rtt <= guest + pause_ms + round_trip + 1 + 5, (rtt, guest, pause_ms, round_trip)
        assert rtt < 0.25 * INTERVAL_MS
