"""Copy-on-write capture (``tremus._cow``): the staging buffer gets every protected
page as it was when it was protected, even when a writer gets there first; every
page is released in the end; and the engine falls back to copying in the pause,
saying why, when the domain cannot offer it."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
import time
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests._microvm_util import boot, needs_kvm
from tremus._cow import CopyOnWrite
from tremus._memory import _huge_bytes, guest_memory
from tremus.accel import impl, native
from tremus.domains.base import DomainError
from tremus.domains.registry import create_domain
from tremus.engine.config import ConfigError, ProtectionConfig
from tremus.engine.events import ProtectionStarted
from tremus.engine.primary import PrimarySession

PAGE = 4096
PAGES = 256


def _cow_or_skip(ram: mmap.mmap, parked_work: mmap.mmap | None = None) -> CopyOnWrite:
    if native is None:
        pytest.skip("copy-on-write needs the native helper")
    try:
        return CopyOnWrite(ram, parked_work=parked_work)
    except OSError as exc:
        pytest.skip(f"no userfaultfd write-protect here: {exc}")


def _wait_until_blocked(threads: list[threading.Thread], timeout: float = 10) -> None:
    """Until every thread waits in a userfaultfd write fault (its kernel wait
    channel): a fixed sleep would assume how fast a loaded machine runs them."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        while True:
            with open(f"/proc/self/task/{thread.native_id}/wchan") as wchan:
                where = wchan.read()
            if where == "handle_userfault":
                break
            assert time.monotonic() < deadline, f"{thread.name} waits in {where!r}, not a fault"
            time.sleep(0.001)


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "memfd"])
def test_writers_wait_for_their_page_to_be_copied(shared: bool) -> None:
    if shared:
        fd = os.memfd_create("cow-test")
        os.ftruncate(fd, PAGES * PAGE)
        ram = mmap.mmap(fd, PAGES * PAGE, mmap.MAP_SHARED)
        os.close(fd)
    else:
        ram = mmap.mmap(-1, PAGES * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram[:] = os.urandom(PAGES * PAGE)
    cow = _cow_or_skip(ram)
    try:
        dirty = list(range(0, PAGES, 3)) + [PAGES - 1]
        pfns = array("Q", sorted(set(dirty))).tobytes()
        cow.protect(pfns)
        at_protect = bytes(ram)
        # Writers that get there before the copy (native memcpy: GIL released while
        # it waits in the fault), to a protected page near the end of the sweep, to
        # one at its start, and to a page that is not protected at all.
        new = os.urandom(PAGE)
        targets = [PAGES - 1, 0, 1]
        done: list[int] = []

        def write(pfn: int) -> None:
            impl.memcpy(memoryview(ram)[pfn * PAGE : (pfn + 1) * PAGE], new)
            done.append(pfn)

        writers = [threading.Thread(target=write, args=(pfn,)) for pfn in targets]
        for writer in writers:
            writer.start()
        deadline = time.monotonic() + 5
        while 1 not in done and time.monotonic() < deadline:
            time.sleep(0.001)
        _wait_until_blocked([w for w, pfn in zip(writers, targets, strict=True) if pfn != 1])
        assert done == [1], done  # the unprotected page was written at once, the others wait
        staging = bytearray(len(pfns) // 8 * PAGE)
        stats = cow.copy(pfns, staging)
        for writer in writers:
            writer.join(5)
            assert not writer.is_alive()
        assert sorted(done) == sorted(targets)
        for k, pfn in enumerate(array("Q", pfns)):
            assert staging[k * PAGE : (k + 1) * PAGE] == at_protect[pfn * PAGE : (pfn + 1) * PAGE]
        assert stats.faults >= 2 and stats.copy_us > 0
        for pfn in targets:
            assert ram[pfn * PAGE : (pfn + 1) * PAGE] == new
        # Everything is released: a write from this thread (GIL held) goes through.
        ram[0:8] = b"released"
        again = cow.copy(array("Q").tobytes(), staging)
        assert again.faults == 0
    finally:
        cow.close()
        ram.close()


def test_huge_page_units_are_protected_whole_and_stay_huge() -> None:
    """With RAM in transparent huge pages, protection is set and lifted a huge page
    at a time: a write to any page of a unit holding a dirty page waits until that
    unit's dirty pages are copied, the staging buffer still gets every dirty page as
    it was, and the RAM is still in huge pages afterwards (nothing was split)."""
    memory = guest_memory(8 << 20)
    if not memory.mostly_huge:
        pytest.skip("no transparent huge pages here")
    ram, unit = memory.mapping, memory.huge_page // PAGE
    ram[:] = os.urandom(len(ram))
    cow = _cow_or_skip(ram)
    cow.unit_pages = unit
    try:
        dirty = [3, 300, unit + 1, 3 * unit + 5]
        pfns = array("Q", dirty).tobytes()
        cow.protect(pfns)
        at_protect = bytes(ram)
        new = os.urandom(PAGE)
        # A clean page in a unit holding a dirty one (waits), one in a unit holding
        # none (goes through at once).
        waiting, free = unit + 7, 2 * unit + 9
        done: list[int] = []

        def write(pfn: int) -> None:
            impl.memcpy(memoryview(ram)[pfn * PAGE : (pfn + 1) * PAGE], new)
            done.append(pfn)

        writers = [threading.Thread(target=write, args=(pfn,)) for pfn in (waiting, free)]
        for writer in writers:
            writer.start()
        deadline = time.monotonic() + 5
        while free not in done and time.monotonic() < deadline:
            time.sleep(0.001)
        _wait_until_blocked([writers[0]])
        assert done == [free], done
        staging = bytearray(len(dirty) * PAGE)
        stats = cow.copy(pfns, staging)
        for writer in writers:
            writer.join(5)
            assert not writer.is_alive()
        for k, pfn in enumerate(dirty):
            assert staging[k * PAGE : (k + 1) * PAGE] == at_protect[pfn * PAGE : (pfn + 1) * PAGE]
        assert stats.faults >= 1
        assert ram[waiting * PAGE : (waiting + 1) * PAGE] == new
        ram[0:8] = b"released"
        after = _huge_bytes(ctypes.addressof(ctypes.c_char.from_buffer(ram)), len(ram))
        assert after >= memory.huge_bytes
    finally:
        cow.close()
        ram.close()


def _write_protected(ram: mmap.mmap) -> list[int]:
    """The pages of ``ram`` the kernel holds write-protected for userfaultfd now
    (bit 57 of /proc/self/pagemap)."""
    first = ctypes.addressof(ctypes.c_char.from_buffer(ram)) // PAGE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = array("Q", pagemap.read(len(ram) // PAGE * 8))
    return [pfn for pfn, entry in enumerate(entries) if entry >> 57 & 1]


@pytest.mark.parametrize("source", ["pfns", "bitmap", "posted"])
@pytest.mark.parametrize("unit_pages", [1, 8, 64])
def test_exactly_the_units_holding_a_dirty_page_are_protected(unit_pages: int,
                                                              source: str) -> None:
    """Runs of whole units, found without reading every pfn (or from a bitmap, or
    from a bitmap posted to a parked work slot that no thread serves: the owner's
    wait runs it): dense units, sparse ones, gaps of one unit and more, the first
    and last pages, units cut by the mapping's alignment; every one released by the
    copy."""
    pages = 1000  # not a whole number of bitmap words
    ram = mmap.mmap(-1, pages * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram[:] = os.urandom(len(ram))
    slot = mmap.mmap(-1, mmap.PAGESIZE) if source == "posted" else None
    cow = _cow_or_skip(ram, slot)
    cow.unit_pages = unit_pages
    shift = ctypes.addressof(ctypes.c_char.from_buffer(ram)) // PAGE % unit_pages
    rng = random.Random(unit_pages)
    try:
        for density in (0.002, 0.02, 0.3, 0.9, 1.0):
            dirty = sorted({0, pages - 1} | {p for p in range(pages) if rng.random() < density})
            units = {(pfn + shift) // unit_pages for pfn in dirty}
            expected = [pfn for pfn in range(pages) if (pfn + shift) // unit_pages in units]
            pfns = array("Q", dirty).tobytes()
            if source == "pfns":
                cow.protect(pfns)
            else:
                bits = sum(1 << pfn for pfn in dirty) | 1 << (pages + 5)  # past the end: ignored
                cow.protect_bitmap(bits.to_bytes(8 * -(-(pages + 6) // 64), "little"))
            if slot is not None:
                assert _write_protected(ram) == []  # posted, not run yet
                assert native is not None
                native.parked_work_wait(slot)
            at_protect = bytes(ram)
            assert _write_protected(ram) == expected, density
            staging = bytearray(len(dirty) * PAGE)
            cow.copy(pfns, staging)
            assert _write_protected(ram) == []
            for k, pfn in enumerate(dirty):
                assert staging[k * PAGE : (k + 1) * PAGE] == at_protect[pfn * PAGE : (pfn + 1) * PAGE]
        assert cow.protects_on_parked_thread == 0
    finally:
        cow.close()
        ram.close()


@pytest.fixture
def posting() -> Iterator[tuple[mmap.mmap, mmap.mmap, CopyOnWrite, int]]:
    """Random RAM of PAGES pages, a parked work slot, copy-on-write posting to that
    slot, and an eventfd for a parked thread to wait on."""
    ram = mmap.mmap(-1, PAGES * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram[:] = os.urandom(len(ram))
    slot = mmap.mmap(-1, mmap.PAGESIZE)
    cow = _cow_or_skip(ram, slot)
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        yield ram, slot, cow, wake
    finally:
        os.close(wake)
        cow.close()
        ram.close()


def _park_flags(*, released: bool) -> bytearray:
    """``kvm_wait_run``'s flags: released or not, the controlling CPU unknown."""
    flags = bytearray(8)
    flags[1] = int(released)
    flags[4:8] = (-1).to_bytes(4, "little", signed=True)
    return flags


def test_a_parked_thread_runs_the_protect_posted_to_it(
        posting: tuple[mmap.mmap, mmap.mmap, CopyOnWrite, int]) -> None:
    """``kvm_wait_run`` (here without a vCPU) runs the protect posted to its slot
    while it waits to be released: the units are protected without the poster doing
    anything, the copy finds it done by the parked thread, and the thread is then
    released as before."""
    ram, slot, cow, wake = posting
    assert native is not None
    flags = _park_flags(released=False)
    result: list[tuple[int, int]] = []
    parked = threading.Thread(target=lambda: result.append(native.kvm_wait_run(
        wake, -1, flags, 30_000_000_000, work=slot)))
    parked.start()
    try:
        while not flags[0]:
            time.sleep(0.001)
        dirty = [3, 4, 100, PAGES - 1]
        cow.protect_bitmap(sum(1 << pfn for pfn in dirty).to_bytes(PAGES // 8, "little"))
        deadline = time.monotonic() + 10
        while _write_protected(ram) != dirty:  # done by the parked thread
            assert time.monotonic() < deadline, _write_protected(ram)
            time.sleep(0.001)
        at_protect = bytes(ram)
        staging = bytearray(len(dirty) * PAGE)
        cow.copy(array("Q", dirty).tobytes(), staging)
        assert cow.protects_on_parked_thread == 1
        assert _write_protected(ram) == []
        assert bytes(staging) == b"".join(at_protect[p * PAGE : (p + 1) * PAGE] for p in dirty)
    finally:
        flags[1] = 1
        os.eventfd_write(wake, 1)
        parked.join(10)
    assert not parked.is_alive() and result and result[0][0] == 0


def test_work_posted_before_the_park_runs_as_the_thread_parks_and_before_it_leaves(
        posting: tuple[mmap.mmap, mmap.mmap, CopyOnWrite, int]) -> None:
    """A protect posted before ``kvm_wait_run`` is entered is taken as the thread
    parks, and a release that was already there when it parked does not let the
    thread return (and enter KVM_RUN) before the protect is done."""
    ram, slot, cow, wake = posting
    assert native is not None
    dirty = [0, 9, PAGES - 2]
    posted_at = time.perf_counter_ns()
    cow.protect_bitmap(sum(1 << pfn for pfn in dirty).to_bytes(PAGES // 8, "little"))
    assert _write_protected(ram) == []  # posted, not run yet
    flags = _park_flags(released=True)  # released before it even parks
    rc, left_at = native.kvm_wait_run(wake, -1, flags, 30_000_000_000, work=slot)
    assert rc == 0 and flags[0] == 1
    assert _write_protected(ram) == dirty  # done by then, by that thread
    at_protect = bytes(ram)
    staging = bytearray(len(dirty) * PAGE)
    stats = cow.copy(array("Q", dirty).tobytes(), staging)
    assert posted_at < stats.protected_at_ns <= left_at  # the time the engine counts
    assert cow.protects_on_parked_thread == 1
    assert bytes(staging) == b"".join(at_protect[p * PAGE : (p + 1) * PAGE] for p in dirty)
    assert _write_protected(ram) == []


def test_a_parked_work_slot_holds_one_protect_at_a_time() -> None:
    ram = mmap.mmap(-1, PAGES * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    slot = mmap.mmap(-1, mmap.PAGESIZE)
    cow = _cow_or_skip(ram, slot)
    assert native is not None
    try:
        with pytest.raises(ValueError, match="no protect was posted"):
            native.wp_protect_bitmap_finish(slot)
        with pytest.raises(ValueError, match="no capture was posted"):
            native.wp_capture_count(slot)
        with pytest.raises(ValueError, match="as large as out"):
            native.wp_capture_post(slot, -1, 0, bytearray(32), None, bytearray(40), -1, ram)
        with pytest.raises(ValueError, match=f"out has 24 bytes, {PAGES} pages need 32"):
            native.wp_capture_post(slot, -1, 0, bytearray(24), None, bytearray(24), -1, ram)
        # A capture whose dirty-log read fails protects nothing and says so.
        native.wp_capture_post(slot, -1, 0, bytearray(32), None, bytearray(32), -1, ram)
        with pytest.raises(OSError, match="KVM_GET_DIRTY_LOG"):
            native.wp_capture_count(slot)
        assert _write_protected(ram) == []
        native.parked_work_wait(slot)  # nothing posted: returns at once
        with pytest.raises(ValueError, match="16-byte aligned buffer of"):
            native.parked_work_wait(bytearray(8))
        with pytest.raises(ValueError, match=f"bitmap has 8 bytes, {PAGES} pages need 32"):
            cow.protect_bitmap(bytes(8))
        bitmap = (1 << 7).to_bytes(PAGES // 8, "little")
        cow.protect_bitmap(bitmap)
        with pytest.raises(ValueError, match="not finished"):
            cow.protect_bitmap(bitmap)
        staging = bytearray(PAGE)
        cow.copy(array("Q", [7]).tobytes(), staging)  # runs it, copies, releases
        assert staging == ram[7 * PAGE : 8 * PAGE] and _write_protected(ram) == []
        assert cow.protects_on_parked_thread == 0
    finally:
        cow.close()
        ram.close()


@pytest.fixture
def plain() -> Iterator[tuple[mmap.mmap, CopyOnWrite]]:
    """Anonymous RAM of PAGES pages and copy-on-write over it."""
    ram = mmap.mmap(-1, PAGES * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    cow = _cow_or_skip(ram)
    try:
        yield ram, cow
    finally:
        cow.close()
        ram.close()


def test_a_bitmap_too_short_for_the_ram_is_refused(plain: tuple[mmap.mmap, CopyOnWrite]
                                                   ) -> None:
    ram, cow = plain
    with pytest.raises(ValueError, match=f"bitmap has 8 bytes, {PAGES} pages need 32"):
        cow.protect_bitmap(bytes(8))
    ram[0:4] = b"free"  # nothing was left protected


def test_bad_pfns_are_refused_before_anything_is_protected(plain: tuple[mmap.mmap, CopyOnWrite]
                                                           ) -> None:
    ram, cow = plain
    with pytest.raises(ValueError, match="ascending"):
        cow.protect(array("Q", [5, 3]).tobytes())
    with pytest.raises(ValueError, match="below"):
        cow.protect(array("Q", [PAGES]).tobytes())
    ram[0:4] = b"free"  # nothing was left protected


def test_secondary_mappings_are_dropped_only_with_nothing_protected(
        plain: tuple[mmap.mmap, CopyOnWrite]) -> None:
    """``drop_secondary_mappings`` lifts protection that is not set (the page tables
    and the pages stay as they were) and is refused while a capture is under way:
    lifting it then would let a writer in before its page is copied. The native
    lift it uses takes off exactly the units of the pages set in its bitmap."""
    ram, cow = plain
    assert native is not None
    ram[:] = os.urandom(len(ram))
    before = bytes(ram)
    every_page = bytes(b"\xff" * (PAGES // 8))
    cow.drop_secondary_mappings(every_page)
    assert _write_protected(ram) == [] and bytes(ram) == before and cow.idle

    cow.unit_pages = 8
    shift = ctypes.addressof(ctypes.c_char.from_buffer(ram)) // PAGE % 8
    dirty = [3, 40, 41, 200]
    units = {(pfn + shift) // 8 for pfn in dirty}
    cow.protect_bitmap(sum(1 << pfn for pfn in dirty).to_bytes(PAGES // 8, "little"))
    protected = _write_protected(ram)
    assert protected == [p for p in range(PAGES) if (p + shift) // 8 in units]
    with pytest.raises(ValueError, match="capture is under way"):
        cow.drop_secondary_mappings(every_page)
    assert _write_protected(ram) == protected

    lifted = (40 + shift) // 8
    assert native.wp_lift_bitmap(cow._fd, ram, (1 << 40).to_bytes(PAGES // 8, "little"), 8) == 1
    assert _write_protected(ram) == [p for p in protected if (p + shift) // 8 != lifted]
    staging = bytearray(len(dirty) * PAGE)
    cow.copy(array("Q", dirty).tobytes(), staging)
    assert _write_protected(ram) == [] and cow.idle
    cow.drop_secondary_mappings(every_page)


def test_capture_must_be_a_known_method() -> None:
    with pytest.raises(ConfigError, match="capture 'fork'"):
        ProtectionConfig(capture="fork")


class _NoCopyOnWrite:
    """A micro-VM that does not offer copy-on-write (a domain double: the engine's
    fallback is under test, not the domain)."""

    def __init__(self, domain: Any) -> None:
        self._domain = domain

    def __getattr__(self, name: str) -> Any:
        if name == "copy_on_write":
            raise AttributeError(name)
        return getattr(self._domain, name)


@needs_kvm
@pytest.mark.parametrize("capture", ["auto", "cow", "copy"])
async def test_without_copy_on_write_the_engine_copies_in_the_pause(capture: str) -> None:
    domain = _NoCopyOnWrite(create_domain("microvm:workload=counter,memory=4M"))
    session = PrimarySession(domain, None, config=ProtectionConfig(interval_ms=5,  # type: ignore[arg-type]
                                                                   capture=capture))
    started: list[ProtectionStarted] = []
    session.events.add_callback(
        lambda e: started.append(e) if isinstance(e, ProtectionStarted) else None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(domain.run)
            if capture == "cow":
                with pytest.raises(DomainError, match="copy-on-write is unavailable"):
                    await session.run()
            else:
                await nursery.start(session.run)
                session.stop()
                await session.stopped.wait()
            domain.stop()
    if capture != "cow":
        assert [(e.capture, bool(e.capture_note)) for e in started] == [
            ("copy", capture == "auto")]
        if capture == "auto":
            assert "does not offer it" in started[0].capture_note


@needs_kvm
async def test_a_micro_vm_reads_its_dirty_log_and_protects_as_its_vcpu_parks() -> None:
    """With ``at_park`` the vCPU thread reads the dirty log and write-protects the
    dirty pages' units as it parks: they are protected when the pausing thread reads
    the count, ``protect_bitmap`` has nothing left to do, and the copy after the
    resume stages the pages as they were at the suspend. A capture nobody claims (a
    resume straight after the suspend, or a read for copying in the pause) leaves
    nothing protected and loses no dirty page."""
    if native is None:
        pytest.skip("copy-on-write needs the native helper")
    vm = boot(workload="dirty", memory="16M", ws="1M", rate="40000", pattern="sequential")
    try:
        cow = vm.copy_on_write()
    except DomainError as exc:
        vm.close()
        pytest.skip(str(exc))
    ram = vm._mmap  # type: ignore[attr-defined]
    unit = cow.unit_pages
    shift = ctypes.addressof(ctypes.c_char.from_buffer(ram)) // PAGE % unit
    far = 0xA00000  # no guest code or data there: only the VMM writes it
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await trio.sleep(0.3)
        cow.at_park = True
        await vm.suspend()
        # Before its kick, KVM dropped its mappings of the pages written so far.
        assert vm.unmapped_before_kick_ns > 0
        bitmap, count = vm.read_dirty_bitmap()
        assert count >= cow.min_pages
        native.parked_work_wait(vm._parked_work)  # type: ignore[attr-defined]
        pfns = vm.dirty_pfns()
        dirty = list(pfns)
        units = {(pfn + shift) // unit for pfn in dirty}
        expected = [p for p in range(len(ram) // PAGE) if (p + shift) // unit in units]
        assert _write_protected(ram) == expected  # by the vCPU thread, nobody asked here
        cow.protect_bitmap(bitmap)  # done already: nothing to post
        assert _write_protected(ram) == expected
        at_suspend = bytes(ram)
        await vm.resume()
        staging = bytearray(len(dirty) * PAGE)
        await trio.to_thread.run_sync(cow.copy, pfns, staging)
        assert cow.protects_on_parked_thread == 1
        assert _write_protected(ram) == []
        for k, pfn in enumerate(dirty):
            assert staging[k * PAGE : (k + 1) * PAGE] == at_suspend[pfn * PAGE : (pfn + 1) * PAGE]

        for unclaimed_by in ("resume", "read_and_clear_dirty"):
            vm.write_ram(far, b"vmm wrote this")
            cow.at_park = True
            await vm.suspend()
            if unclaimed_by == "resume":
                await vm.resume()
                assert _write_protected(ram) == []
                cow.at_park = False
                await vm.suspend()
            listed = list(vm.read_and_clear_dirty())
            assert _write_protected(ram) == []
            assert far // PAGE in listed and cow.idle, unclaimed_by
            await vm.resume()
        vm.stop()
