"""Pause time of a checkpoint, with the engine's steps done by hand, for both ways
of capturing the dirty pages.

For a micro-VM running the ``dirty`` workload over a working set of about D pages
(sequential pattern, so each epoch dirties the whole set; D = 1, 256, 1024, 4096,
16384), each ``method`` in the same run:

* ``copy`` — the dirty pages are copied into the staging buffer inside the pause;
* ``cow`` — copy-on-write (``tremus._cow``): inside the pause they are only
  write-protected (userfaultfd, a 2 MiB unit at a time when the guest's RAM is in
  transparent huge pages: ``unit_pages``); after resume the native helper copies them
  while the guest runs, and a guest write to a unit not yet copied waits for it. As in
  the engine, an epoch of fewer than ``CopyOnWrite.min_pages`` (64) dirty pages is
  copied in the pause instead (cheaper than the write-protect call).

Per row, medians over the epochs:

* ``kick_us`` — from the suspend request to the vCPU parked (KVM's emulator only
  notices a signal at timer ticks here: reported apart from the pause); it includes
  ``unmap_us``, cow rows: before the kick, while the guest runs, the pausing thread
  reads the dirty log (without clearing it) and lifts the protection, which is not
  set, from the dirty pages' units, and KVM walks its map of them and drops their
  mappings (``CopyOnWrite.drop_secondary_mappings``): the write-protect in the pause
  then finds that walk's data in the cache;
* ``pause_us`` (``_p90``, ``_max``) — from "vCPU stopped" (the vCPU thread parks in C
  as KVM_RUN returns after the kick, or as its HLT wait wakes, and stamps it then)
  to "vCPU running again";
* ``steps_us`` — the engine's own work inside the pause (dirty log + capture + state);
* the breakdown of the pause: ``wake_us`` (vCPU parked -> ``suspend()`` returned in
  the Trio thread), ``dirty_log_us`` (the dirty log as a bitmap: copy rows read it
  here; cow rows, as the engine after its first checkpoint, posted the capture to
  the vCPU thread before the kick (``at_park``), which read the log as it parked,
  then its registers (from ``kvm_run``; the FPU of this guest cannot change), then
  write-protects the dirty pages' units on its own CPU:
  this is the wait for that read. With KVM's manual dirty-log protection, clearing
  it is left to ``resume``, or under copy-on-write to the copy after it),
  ``capture_us`` (copy: list the pfns and copy the pages; cow: nothing left to do,
  the pfns are listed after the resume), ``state_us`` (snapshot the vCPU and device
  state; encoding it waits until after the resume, as in the engine),
  ``release_us`` (state saved -> ``resume`` released the vCPU: copy rows clear the
  dirty log there; the vCPU thread finishes the write-protect before it enters
  KVM_RUN, so nobody waits for it here), ``reentry_us`` (released -> the vCPU
  thread back in KVM_RUN: under cow, after the write-protect). They add up to
  ``pause_us`` roughly;
* cow only, what the guest pays after the pause: ``copy_us`` (the copy after resume),
  ``cow_faults`` / ``cow_faults_max`` (guest writes per epoch that waited for their
  unit) and ``fault_serve_us_max`` (the longest time serving one such fault: copying
  the unit's dirty pages not yet copied; the writer also waited for the copy loop to
  look, at most one step of 64 pages or one unit), and ``protect_on_parked_thread``
  (the share of the epochs whose write-protect the parked vCPU thread ran; the
  others ran in the thread that waited for it).

Target: cow pause <= 200 us at every D (Remus: ~4.4 ms at 1024 on 2008 hardware).
"""

from __future__ import annotations

import statistics
import time

import _common
import trio

from tremus._cow import CopyStats
from tremus._memory import prefaulted_buffer
from tremus.accel import impl
from tremus.domains.microvm import MicroVM, MicroVMConfig


async def measure(pages: int, epochs: int, method: str) -> dict[str, float | int | str]:
    rate = 40_000
    config = MicroVMConfig.from_options({
        "workload": "dirty", "memory": f"{max(16, (pages * 4096 >> 20) + 4)}M",
        "ws": f"{pages * 4}K", "rate": str(rate), "pattern": "sequential",
    })
    vm = MicroVM.boot(config)
    cow = vm.copy_on_write() if method == "cow" else None
    if cow is not None:
        cow.at_park = True  # as the engine does after the first (full) checkpoint
    staging = prefaulted_buffer(config.memory)  # page-aligned, as the engine's
    rows: list[tuple[int, float, float, float]] = []
    parts: dict[str, list[float]] = {k: [] for k in (
        "unmap_us", "wake_us", "dirty_log_us", "capture_us", "state_us", "release_us",
        "reentry_us")}
    copies: list[CopyStats] = []
    on_vcpu_thread: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.suspend()
        vm.read_and_clear_dirty()
        await vm.resume()
        for _ in range(epochs + 1):
            await trio.sleep(max(0.05, 2 * pages / rate))
            await vm.suspend()
            t0 = time.perf_counter_ns()
            # As the engine does: copy-on-write protects from the dirty bitmap and
            # lists the pfns after the resume; an epoch too small to gain from
            # write-protection is copied in the pause.
            bitmap, count = vm.read_dirty_bitmap()
            t_dirty = time.perf_counter_ns()
            protected = cow is not None and count >= cow.min_pages
            if cow is not None and protected:
                cow.protect_bitmap(bitmap)
            else:
                impl.gather(vm.ram, vm.dirty_pfns(), staging)
            t_capture = time.perf_counter_ns()
            encode_state = vm.state_snapshot()  # encoded after the resume, as the engine does
            t1 = time.perf_counter_ns()
            await vm.resume()
            encode_state()
            if cow is not None and protected:
                pfns = vm.dirty_pfns()
                before = cow.protects_on_parked_thread
                copies.append(await trio.to_thread.run_sync(cow.copy, pfns, staging))
                on_vcpu_thread.append(cow.protects_on_parked_thread > before)
            while vm.resumed_at_ns < vm.stopped_at_ns:
                await trio.sleep(0)
            rows.append((count, (vm.resumed_at_ns - vm.stopped_at_ns) / 1e3,
                         vm.kick_latency_ns / 1e3, (t1 - t0) / 1e3))
            for key, ns in (("unmap_us", vm.unmapped_before_kick_ns),
                            ("wake_us", t0 - vm.stopped_at_ns), ("dirty_log_us", t_dirty - t0),
                            ("capture_us", t_capture - t_dirty), ("state_us", t1 - t_capture),
                            ("release_us", vm.released_at_ns - t1),
                            ("reentry_us", vm.resumed_at_ns - vm.released_at_ns)):
                parts[key].append(ns / 1e3)
        vm.stop()
    rows = rows[1:]  # the first epoch includes the warm-up
    pause = sorted(r[1] for r in rows)
    row: dict[str, float | int | str] = {
        "method": method,
        "dirty_pages_target": pages,
        "dirty_pages": int(statistics.median(r[0] for r in rows)),
        "epochs": len(rows),
        "pause_us": round(statistics.median(pause), 1),
        "pause_us_p90": round(pause[int(0.9 * (len(pause) - 1))], 1),
        "pause_us_max": round(pause[-1], 1),
        "steps_us": round(statistics.median(r[3] for r in rows), 1),
        "kick_us": round(statistics.median(r[2] for r in rows), 1),
        "kick_us_max": round(max(r[2] for r in rows), 1),
        **{key: round(statistics.median(values[1:]), 1) for key, values in parts.items()},
    }
    if copies:
        copies, on_vcpu_thread = copies[1:], on_vcpu_thread[1:]
        row.update({
            "copy_us": round(statistics.median(c.copy_us for c in copies), 1),
            "cow_faults": statistics.median(c.faults for c in copies),
            "cow_faults_max": max(c.faults for c in copies),
            "fault_serve_us_max": round(max(c.serve_max_us for c in copies), 1),
            "unit_pages": cow.unit_pages if cow is not None else 1,
            "protect_on_parked_thread": round(sum(on_vcpu_thread) / len(on_vcpu_thread), 2),
        })
    return row


async def main(quick: bool, smoke: bool) -> None:
    results = []
    for pages in (1, 256) if smoke else (1, 256, 1024, 4096, 16384):
        for method in ("copy", "cow"):
            _common.log(f"pause: {pages} pages, {method}")
            row = await measure(pages, 3 if smoke else 10 if quick else 40, method)
            _common.log(f"  pause {row['pause_us']} us (p90 {row['pause_us_p90']}), "
                        f"dirty {row['dirty_pages']}, capture {row['capture_us']} us")
            results.append(row)
    _common.emit("pause", results, target={"method": "cow", "pause_us_max": 200})


if __name__ == "__main__":
    args = _common.arg_parser(__doc__ or "").parse_args()
    trio.run(main, args.quick, args.smoke)
