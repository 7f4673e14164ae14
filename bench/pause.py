"""Pause time of a checkpoint, with the engine's steps done by hand.

For a micro-VM running the ``dirty`` workload over a working set of about D pages
(sequential pattern, so each epoch dirties the whole set), measure per epoch:

* ``kick_us`` — from the suspend request to the vCPU parked (KVM's emulator only
  notices a signal at timer ticks here: reported apart from the pause);
* ``pause_us`` — from "vCPU stopped" to "vCPU running again": read and clear the
  dirty log, gather the dirty pages into a staging buffer (native, GIL released),
  save vCPU and device state, resume;
* ``steps_us`` — the engine's own work inside the pause (dirty log + gather + state);
* the breakdown of the pause, medians: ``wake_us`` (vCPU parked -> ``suspend()``
  returned in the Trio thread), ``dirty_log_us`` (read and clear the dirty log),
  ``gather_us`` (copy the dirty pages), ``state_us`` (save vCPU and device state),
  ``release_us`` (state saved -> resume released the vCPU), ``reentry_us`` (released
  -> the vCPU thread back in KVM_RUN). They add up to ``pause_us`` (medians, roughly).

Target: pause ≤ 1 ms at 1024 dirty pages (Remus: ~4.4 ms on 2008 hardware).
"""

from __future__ import annotations

import statistics
import time

import _common
import trio

from tremus._memory import prefaulted_buffer
from tremus.accel import impl
from tremus.domains.microvm import MicroVM, MicroVMConfig


async def measure(pages: int, epochs: int) -> dict[str, float | int]:
    rate = 40_000
    config = MicroVMConfig.from_options({
        "workload": "dirty", "memory": f"{max(16, (pages * 4096 >> 20) + 4)}M",
        "ws": f"{pages * 4}K", "rate": str(rate), "pattern": "sequential",
    })
    vm = MicroVM.boot(config)
    staging = prefaulted_buffer(config.memory)  # page-aligned, as the engine's
    rows: list[tuple[int, float, float, float]] = []
    parts: dict[str, list[float]] = {k: [] for k in (
        "wake_us", "dirty_log_us", "gather_us", "state_us", "release_us", "reentry_us")}
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.suspend()
        vm.read_and_clear_dirty()
        await vm.resume()
        for _ in range(epochs + 1):
            await trio.sleep(max(0.05, 1.5 * pages / rate))
            await vm.suspend()
            t0 = time.perf_counter_ns()
            pfns = vm.read_and_clear_dirty()
            t_dirty = time.perf_counter_ns()
            impl.gather(vm.ram, pfns, staging)
            t_gather = time.perf_counter_ns()
            vm.save_state()
            t1 = time.perf_counter_ns()
            await vm.resume()
            while vm.resumed_at_ns < vm.stopped_at_ns:
                await trio.sleep(0)
            rows.append((len(pfns), (vm.resumed_at_ns - vm.stopped_at_ns) / 1e3,
                         vm.kick_latency_ns / 1e3, (t1 - t0) / 1e3))
            for key, ns in (("wake_us", t0 - vm.stopped_at_ns), ("dirty_log_us", t_dirty - t0),
                            ("gather_us", t_gather - t_dirty), ("state_us", t1 - t_gather),
                            ("release_us", vm.released_at_ns - t1),
                            ("reentry_us", vm.resumed_at_ns - vm.released_at_ns)):
                parts[key].append(ns / 1e3)
        vm.stop()
    rows = rows[1:]  # the first epoch includes the warm-up
    pause = sorted(r[1] for r in rows)
    return {
        "dirty_pages_target": pages,
        "dirty_pages": int(statistics.median(r[0] for r in rows)),
        "epochs": len(rows),
        "pause_us": round(statistics.median(pause), 1),
        "pause_us_p90": round(pause[int(0.9 * (len(pause) - 1))], 1),
        "steps_us": round(statistics.median(r[3] for r in rows), 1),
        "kick_us": round(statistics.median(r[2] for r in rows), 1),
        "kick_us_max": round(max(r[2] for r in rows), 1),
        **{key: round(statistics.median(values[1:]), 1) for key, values in parts.items()},
    }


async def main(quick: bool) -> None:
    results = []
    for pages in (1, 256, 1024, 4096):
        _common.log(f"pause: {pages} pages")
        results.append(await measure(pages, 10 if quick else 40))
    _common.emit("pause", results, target={"dirty_pages": 1024, "pause_us_max": 1000})


if __name__ == "__main__":
    args = _common.arg_parser(__doc__ or "").parse_args()
    trio.run(main, args.quick)
