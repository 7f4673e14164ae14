"""Pause per checkpoint against dirty pages, through the real engine.

``bench/pause.py`` does the engine's steps by hand; this one runs the real
``PrimarySession`` on a micro-VM with the ``dirty`` workload (sequential pattern,
so each epoch dirties its whole working set of W pages) in two modes:

* ``blackhole`` — ``PrimarySession(domain, None)``: checkpoints are built, framed
  and dropped (``xl remus -b``);
* ``tcp`` — over ``tcp://127.0.0.1`` to a ``BackupSession`` in the same Trio run
  (it verifies, stages and applies every checkpoint and ACKs).

The guest's speed is measured, not assumed: a calibration VM measures how many
pages a second the emulated guest really dirties, and the interval is chosen so that
it touches its whole working set (2x margin, at least 50 ms). Per row:

* ``dirty_pages`` — median over measured epochs (W plus the guest's own stack/data);
* ``pause_us`` / ``pause_us_p90`` — the engine's pause (``CheckpointAcked.pause_us``:
  from the vCPU parked to the vCPU released by ``resume``: dirty log, gather, state);
* ``guest_pause_us`` — what the guest saw: from its vCPU parking to the vCPU thread
  back from its wait and entering KVM_RUN (``MicroVM.stopped_at_ns`` and
  ``resumed_at_ns``): the engine's pause plus the thread's wake-up;
* ``wake_us`` — that wake-up alone: from ``resume`` releasing the vCPU
  (``released_at_ns``) to the vCPU thread back from its wait;
* ``kick_us`` — suspend request to vCPU parked (reported apart: KVM's emulator only
  notices the kick signal at timer ticks on these machines).

Target: pause <= 1000 us at 1024 dirty pages (Remus: ~4.4 ms on 2008 hardware).

    python bench/engine_pause.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tremus import transports  # noqa: E402
from tremus.domains.registry import create_domain  # noqa: E402
from tremus.engine.backup import BackupSession  # noqa: E402
from tremus.engine.config import ProtectionConfig  # noqa: E402
from tremus.engine.events import CheckpointAcked, Event  # noqa: E402

RATE = 40_000  # pages/s asked of the guest; what it achieves is measured
WARMUP = 3  # epochs dropped: the full first checkpoint and the cache warm-up


def spec(pages: int) -> str:
    memory = max(16, (pages * 4096 >> 20) + 4)
    return (f"microvm:workload=dirty,memory={memory}M,ws={pages * 4}K,rate={RATE},"
            "pattern=sequential")


async def calibrate(window_s: float = 0.2, windows: int = 5) -> float:
    """Pages per second the emulated guest really dirties (working set large enough
    not to saturate in one window); the median over ``windows`` windows."""
    domain: Any = create_domain(spec(16384))
    rates = []
    async with trio.open_nursery() as nursery:
        await nursery.start(domain.run)
        await trio.sleep(0.2)  # boot
        await domain.suspend()
        domain.read_and_clear_dirty()
        await domain.resume()
        for _ in range(windows):
            start = trio.current_time()
            await trio.sleep(window_s)
            await domain.suspend()
            elapsed = trio.current_time() - start
            rates.append(len(domain.read_and_clear_dirty()) / elapsed)
            await domain.resume()
        domain.stop()
    return statistics.median(rates)


async def measure(mode: str, pages: int, epochs: int, interval_ms: float) -> dict[str, Any]:
    domain: Any = create_domain(spec(pages))
    cfg = ProtectionConfig(interval_ms=interval_ms, heartbeat_timeout_ms=30_000)
    acked: list[CheckpointAcked] = []
    guest_pause: dict[int, float] = {}
    wake: dict[int, float] = {}
    enough = trio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, CheckpointAcked):
            acked.append(event)
            if len(acked) >= WARMUP + epochs:
                enough.set()

    # The vCPU thread stamps the end of its park only once it is back from KVM_RUN,
    # so read an epoch's stamps at the next suspend (an interval later).
    suspend = domain.suspend
    suspends = 0

    async def suspend_and_stamp() -> None:
        nonlocal suspends
        if suspends and domain.resumed_at_ns > domain.stopped_at_ns:
            guest_pause[suspends - 1] = (domain.resumed_at_ns - domain.stopped_at_ns) / 1e3
            released = getattr(domain, "released_at_ns", 0)
            if released > domain.stopped_at_ns:
                wake[suspends - 1] = (domain.resumed_at_ns - released) / 1e3
        suspends += 1
        await suspend()

    domain.suspend = suspend_and_stamp

    async with trio.open_nursery() as nursery:
        stream = None
        if mode == "tcp":
            listener = await transports.listen("tcp://127.0.0.1:0")

            async def serve() -> None:
                accepted = await listener.accept()
                await listener.aclose()
                await BackupSession(accepted, config=cfg).run()

            nursery.start_soon(serve)
            stream = await transports.connect(listener.url)
        await _common.protect_until(domain, stream, cfg, on_event, enough,
                                    60 + (WARMUP + epochs) * interval_ms / 1000 * 3)
    rows = acked[WARMUP : WARMUP + epochs]
    pause = sorted(e.pause_us for e in rows)
    guest = sorted(guest_pause[e.epoch] for e in rows if e.epoch in guest_pause)
    wakes = sorted(wake[e.epoch] for e in rows if e.epoch in wake)
    return {
        "mode": mode,
        "working_set_pages": pages,
        "dirty_pages": int(statistics.median(e.dirty_pages for e in rows)),
        "dirty_pages_min": min(e.dirty_pages for e in rows),
        "epochs": len(rows),
        "interval_ms": interval_ms,
        "pause_us": round(statistics.median(pause), 1),
        "pause_us_p90": round(pause[int(0.9 * (len(pause) - 1))], 1),
        "pause_us_max": round(pause[-1], 1),
        "guest_pause_us": round(statistics.median(guest), 1) if guest else None,
        "guest_pause_us_p90": round(guest[int(0.9 * (len(guest) - 1))], 1) if guest else None,
        "guest_pause_us_max": round(guest[-1], 1) if guest else None,
        "wake_us": _pct(wakes, 0.5),
        "wake_us_p90": _pct(wakes, 0.9),
        "wake_us_max": _pct(wakes, 1.0),
        "kick_us": round(statistics.median(e.kick_us for e in rows), 1),
        "kick_us_max": round(max(e.kick_us for e in rows), 1),
        "round_trip_ms": round(statistics.median(e.round_trip_ms for e in rows), 2),
    }


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank below) of sorted ``values``, or None."""
    return round(values[int(q * (len(values) - 1))], 1) if values else None


async def main(quick: bool, smoke: bool) -> None:
    sizes = (1, 256, 1024, 4096)
    epochs = 40 if not quick else 10
    modes = ("blackhole", "tcp")
    if smoke:
        sizes, epochs = (256,), 3
    _common.log("engine_pause: calibrating the guest's dirty rate")
    rate = await calibrate(0.1 if quick or smoke else 0.2, 3 if quick or smoke else 5)
    _common.log(f"  the guest dirties {rate:.0f} pages/s (asked {RATE})")
    results = []
    for pages in sizes:
        interval_ms = round(max(50.0, min(3000.0, 2000 * pages / rate)), 1)
        for mode in modes:
            row = await measure(mode, pages, epochs, interval_ms)
            _common.log(f"  {mode} ws={pages}: {row['dirty_pages']} dirty pages, pause "
                        f"{row['pause_us']} us (p90 {row['pause_us_p90']}), guest pause "
                        f"{row['guest_pause_us']} us (max {row['guest_pause_us_max']}), wake "
                        f"{row['wake_us']} us (max {row['wake_us_max']}), kick {row['kick_us']} us")
            results.append(row)
    _common.emit("engine_pause", results,
                 target={"dirty_pages": 1024, "pause_us_max": 1000},
                 params={"guest_dirty_rate_pages_per_s": round(rate), "rate_asked": RATE,
                         "pattern": "sequential", "codec": ProtectionConfig().codec,
                         "warmup_epochs_dropped": WARMUP, "quick": quick, "smoke": smoke})


if __name__ == "__main__":
    parser = _common.arg_parser(__doc__ or "")
    args = parser.parse_args()
    trio.run(main, args.quick, args.smoke)
