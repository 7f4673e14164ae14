"""Request -> reply round trip of the kv guest, unprotected and protected.

Output commit has a price clients pay in latency: a reply produced in epoch N leaves
only when the backup has acknowledged checkpoint N, so it waits for the end of the
epoch (on average half an interval, for a request arriving at a random moment) plus
the checkpoint's round trip. This measures that price on real processes and a real
network: for every configuration a fresh three-host namespace topology
(``tests/_netharness.py``), ``tremus backup`` on one host, ``tremus protect`` of the
kv guest on another (or ``tremus run``, unprotected), and a UDP client on the third
sending one request at a time (alternating ``SET``/``GET``), each after a random
pause of up to one interval so that requests land at random phases of the epochs.

Rows: ``netbuf`` is ``unprotected`` (``tremus run``: the limit), ``none``
(``protect --netbuf none --unsafe``: checkpointing pauses, no buffering), ``vmm`` and
``nfqueue``, at ``interval_ms`` 10, 25, 50, 100, 200. Figures: ``rtt_ms_median``,
``rtt_ms_p90``, ``rtt_ms_mean`` (steadier than the median for a wait spread evenly
over an interval), ``ratio_to_unprotected`` (median over the unprotected median,
measured in the same run), ``expected_ms`` (interval / 2 + median checkpoint round
trip: what output commit should cost), and the primary's median ``ack_rtt_ms`` and
``pause_us``. Needs root, ``/dev/kvm`` and (for nfqueue) iptables.

    python bench/latency.py [--quick]
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tests._netharness import KvNet, NsProcess, kv_net  # noqa: E402
from tremus.testing.topology import require_root  # noqa: E402

INTERVALS = (10, 25, 50, 100, 200)
QUICK_INTERVALS = (10, 50, 200)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


async def _measure(net: KvNet, requests: int, spread_s: float, rng: random.Random
                   ) -> list[float]:
    rtts = []
    for i in range(requests + 1):
        await trio.sleep(rng.uniform(0, spread_s))
        request = f"SET k{i // 2} v{i}" if i % 2 == 0 else f"GET k{i // 2}"
        exchange = await net.ask(request, timeout=30)
        if i:  # the first one also waits for ARP
            rtts.append(exchange.rtt_ms)
    return rtts


def _median_of(proc: NsProcess, event: str, key: str) -> float | None:
    values = [e[key] for e in proc.of(event)[1:]]  # the first checkpoint is the whole RAM
    return round(statistics.median(values), 2) if values else None


async def _one(netbuf: str, interval_ms: float | None, requests: int, rng: random.Random
               ) -> dict[str, Any]:
    async with kv_net() as net:
        if netbuf == "unprotected":
            await net.start_unprotected()
            primary = None
        else:
            await net.start_backup()
            extra = ("--unsafe",) if netbuf == "none" else ()
            assert interval_ms is not None
            primary = await net.start_primary(netbuf, interval_ms, *extra)
        spread = (interval_ms or 50) / 1000
        started = time.perf_counter()
        rtts = await _measure(net, requests, spread, rng)
        took = time.perf_counter() - started
        row: dict[str, Any] = {
            "interval_ms": interval_ms,
            "netbuf": netbuf,
            "requests": len(rtts),
            "rtt_ms_median": round(statistics.median(rtts), 2),
            "rtt_ms_p90": round(_p90(rtts), 2),
            "rtt_ms_mean": round(statistics.fmean(rtts), 2),
            "rtt_ms_min": round(min(rtts), 2),
        }
        if primary is not None:
            lost = primary.of("backup_lost")
            if lost:
                raise RuntimeError(f"{netbuf}@{interval_ms}: backup lost: {lost[0]}")
            row["ack_rtt_ms"] = _median_of(primary, "checkpoint_acked", "round_trip_ms")
            row["pause_us"] = _median_of(primary, "checkpoint_acked", "pause_us")
            if netbuf != "none" and interval_ms is not None and row["ack_rtt_ms"] is not None:
                row["expected_ms"] = round(interval_ms / 2 + row["ack_rtt_ms"], 2)
        _common.log(f"  {netbuf:>11} @ {interval_ms} ms: median {row['rtt_ms_median']} ms, "
                    f"p90 {row['rtt_ms_p90']} ms ({took:.1f} s)")
        return row


async def run(quick: bool) -> list[dict[str, Any]]:
    rng = random.Random(20240607)
    requests = 20 if quick else 100
    intervals = QUICK_INTERVALS if quick else INTERVALS
    netbufs = ["vmm"]
    if shutil.which("iptables"):
        netbufs.append("nfqueue")
    else:
        _common.log("iptables not installed: no nfqueue rows")
    _common.log(f"unprotected baseline ({requests} requests)")
    base = await _one("unprotected", None, requests, rng)
    base["ratio_to_unprotected"] = 1.0
    rows = [base]
    for netbuf in ["none", *netbufs]:
        for interval in intervals:
            if quick and netbuf == "none" and interval != 50:
                continue
            row = await _one(netbuf, interval, requests, rng)
            row["ratio_to_unprotected"] = round(row["rtt_ms_median"] / base["rtt_ms_median"], 1)
            rows.append(row)
    return rows


def main() -> int:
    parser = _common.arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    why_not = require_root() or (None if os.path.exists("/dev/kvm") else "needs /dev/kvm")
    if why_not is not None:
        _common.log(f"latency: {why_not}")
        return 1
    started = time.perf_counter()
    rows = trio.run(run, args.quick)
    _common.log(f"done in {time.perf_counter() - started:.1f} s")
    _common.emit("latency", rows, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
