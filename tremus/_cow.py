"""Copy-on-write capture of a checkpoint's pages (userfaultfd write-protect).

Copying the dirty pages while the guest is stopped makes the pause grow with them.
Instead, in the pause the dirty pages are write-protected (a page-table entry per
2 MiB when the RAM is in transparent huge pages: ~130 us for 64 MiB of dirty pages
against ~15 ms to copy them), the guest resumes, and the native helper copies them into
the staging buffer while it serves write faults: a write to a page not yet copied
waits until that page is copied, then goes on. The staging buffer ends up holding
every page as it was at the suspend, exactly as a copy in the pause would.

Whoever owns a RAM mapping may offer this for it (the micro-VM does); the engine
uses it when the domain offers it and falls back to copying in the pause.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

from tremus.accel import native

__all__ = ["CopyOnWrite", "CopyStats"]


@dataclass(frozen=True, slots=True)
class CopyStats:
    """One background copy: ``faults`` writes waited for their page to be copied,
    serving them took ``serve_us`` in all (``serve_max_us`` the longest), and the
    whole copy ``copy_us``; ``protected_at_ns``, when its protect was done."""

    faults: int
    serve_us: float
    serve_max_us: float
    copy_us: float
    #: When a protect posted to the parked vCPU thread was done (CLOCK_MONOTONIC ns,
    #: as ``time.perf_counter_ns``): that thread let the guest run only after it. 0:
    #: the protect ran in the pause itself.
    protected_at_ns: int = 0


@final
class CopyOnWrite:
    """Write-protect-then-copy over one RAM mapping (page-aligned, writable).

    Raises:
        OSError: userfaultfd write-protect is not available here (the message names
            the step: no permission, a kernel without it, a mapping it cannot cover).
    """

    #: Pages copied between two looks for waiting writers (bounds a writer's wait).
    run_pages = 64
    #: Fewer dirty pages than this are copied in the pause (~0.85 us a page here):
    #: protecting them costs little (a few us for the call and each unit), but the
    #: copy after the resume goes through a worker thread's wake-up and the send
    #: waits for it.
    min_pages = 64

    def __init__(self, ram: Any, *, unit_pages: int = 1,
                 rearm: Callable[[], None] | None = None, parked_work: Any = None) -> None:
        if native is None:
            raise OSError("copy-on-write needs the native helper (tremus._native)")
        self._ram = ram
        #: Protection is set and lifted this many pages at a time, aligned in the
        #: address space: RAM in transparent huge pages is protected a huge page at a
        #: time, one page-table entry however many of its pages are dirty, and stays
        #: in huge pages (lifting part of one would split it).
        self.unit_pages = unit_pages
        self._rearm = rearm
        self._rearm_due = False
        #: A parked work slot of the owner (``native.kvm_wait_run``'s ``work``):
        #: ``protect_bitmap`` is then posted to its parked vCPU thread and runs on
        #: that thread's CPU while the pause goes on; the owner waits for it
        #: (``native.parked_work_wait``) before it lets the guest run.
        self._parked_work = parked_work
        #: ram and bitmap of a posted protect, held until it is finished.
        self._posted: tuple[memoryview, memoryview] | None = None
        #: Protects the parked thread ran (the others ran in ``copy``'s thread).
        self.protects_on_parked_thread = 0
        #: Set by the user before a suspend: the owner posts the next pause's capture
        #: to its vCPU thread before it parks (``post_at_park``), which then reads the
        #: dirty log and write-protects the pages as it parks, before the pausing
        #: thread has even woken. Left False for a pause that copies everything (a
        #: full checkpoint) or that does not capture.
        self.at_park = False
        #: The buffers of a posted capture, held until it is claimed: those its
        #: protect uses (ram, bitmap), and those only its dirty-log read uses.
        self._capture: tuple[tuple[memoryview, memoryview], tuple[memoryview, ...]] | None = None
        #: ``claim_at_park`` found the pages protected: ``protect_bitmap`` has
        #: nothing left to do for them.
        self._protected_at_park = False
        self._protected_at_ns = 0
        #: Pages are protected (or being so) that no ``copy`` or ``release_all`` has
        #: released yet: set with every protect, posted or not.
        self._holding = False
        self._fd = native.wp_open(ram)

    @property
    def rearm_due(self) -> bool:
        """``protect`` ran and ``copy`` has not yet: the owner's ``rearm`` (given at
        construction) is left to ``copy``, after the resume."""
        return self._rearm_due

    def protect(self, pfns: Any) -> None:
        """In the pause: write-protect pages ``pfns`` (ascending little-endian u64).
        ``copy`` must follow, or the guest's next write to one of them waits for ever.

        The owner's dirty tracking of these pages may then restart after the resume,
        in ``copy`` (``rearm``), out of the pause: until ``copy`` releases a page, no
        write reaches it, so none can go unrecorded. ``pfns`` must hold every page
        whose tracking ``rearm`` restarts.
        """
        assert native is not None
        native.wp_protect(self._fd, self._ram, pfns, self.unit_pages)
        self._holding = True
        self._rearm_due = self._rearm is not None

    def protect_bitmap(self, bitmap: Any) -> None:
        """``protect`` for the pages set in ``bitmap`` (bit ``i`` of little-endian u64
        word ``i // 64`` is page ``i``); ``copy`` then takes their pfns. Nothing to
        do if they were protected as the vCPU parked (``claim_at_park``)."""
        assert native is not None
        if self._protected_at_park:
            self._protected_at_park = False
            return
        if self._parked_work is None:
            native.wp_protect_bitmap(self._fd, self._ram, bitmap, self.unit_pages)
        else:
            posted = (memoryview(self._ram), memoryview(bitmap))
            native.wp_protect_bitmap_post(self._parked_work, self._fd, *posted, self.unit_pages)
            self._posted = posted
        self._holding = True
        self._rearm_due = self._rearm is not None

    def drop_secondary_mappings(self, bitmap: Any) -> None:
        """Before a pause, with nothing protected (``idle``): lift protection (none is
        set) from the units of the pages set in ``bitmap``. The pages and the
        process's page tables stay as they are, but the kernel tells the RAM's
        secondary MMUs the range changed, as a write-protect does: KVM walks its
        reverse map of those pages and drops its mappings of them. That walk is most
        of a write-protect's cost; made while the guest runs, it leaves the protect
        in the pause the same data in the cache (most of the gain, measured in
        bench/RESULTS.md) and fewer mappings to drop. The guest maps again, in the
        kernel, the pages it touches, as after every protect. ValueError unless
        ``idle``: lifting protection from a page not yet copied would let the guest
        write over it."""
        assert native is not None
        if not self.idle:
            raise ValueError("a capture is under way: its pages must stay protected")
        native.wp_lift_bitmap(self._fd, self._ram, bitmap, self.unit_pages)

    @property
    def idle(self) -> bool:
        """Nothing posted, protected or left to copy: a new capture may start."""
        # A posted protect, or a re-arm left to ``copy``, comes with pages held.
        return self._capture is None and not self._holding

    @property
    def posted_at_park(self) -> bool:
        """A capture was posted (``post_at_park``) and not yet claimed."""
        return self._capture is not None

    def post_at_park(self, vm_fd: int, mem_slot: int, log: Any, extra: Any, out: Any) -> None:
        """Before the owner's vCPU thread parks (it must serve the parked work slot):
        post the pause's capture to it. As it parks it reads KVM's dirty log of
        ``mem_slot`` into ``log`` and merges the VMM's own writes (``extra``, then
        zeroed) into the bitmap ``out``; then, if ``min_pages`` or more are dirty, it
        write-protects them. ``claim_at_park`` gives the count; the buffers must stay
        as they are until then."""
        assert native is not None
        if self._parked_work is None:
            raise ValueError("a capture at park needs the owner's parked work slot")
        kept = (memoryview(self._ram), memoryview(out))
        read = (memoryview(log), *(() if extra is None else (memoryview(extra),)))
        native.wp_capture_post(self._parked_work, vm_fd, mem_slot, log, extra, out, self._fd,
                               self._ram, self.unit_pages, self.min_pages)
        self._capture = (kept, read)

    def claim_at_park(self) -> int:
        """In the pause: the dirty pages the posted capture found (waiting for its
        read of the dirty log if it has not happened yet). With ``min_pages`` or more
        they are write-protected, or being so: ``protect_bitmap`` of its bitmap then
        has nothing to do, and ``copy`` must follow as after it. OSError if the dirty
        log could not be read (nothing is protected)."""
        assert native is not None
        capture, self._capture = self._capture, None
        if capture is None:
            raise ValueError("no capture was posted")
        kept, read = capture
        protecting = False
        try:
            count, protecting = native.wp_capture_count(self._parked_work)
        finally:
            for view in read if protecting else read + kept:
                view.release()
        if protecting:
            self._posted = kept
            self._holding = True
            self._protected_at_park = True
            self._rearm_due = self._rearm is not None
        return int(count)

    def release_all(self) -> None:
        """Undo a protect that no ``copy`` will follow: wait for it, then lift all
        protection (nothing is copied; the owner must count those pages dirty again)."""
        assert native is not None
        self._protected_at_park = False
        self._rearm_due = False
        try:
            self._finish_protect()
        finally:
            native.wp_release(self._fd, self._ram)
            self._holding = False

    def _finish_protect(self) -> None:
        """The posted protect, done (here if nobody ran it yet); OSError if it failed
        (what it protected is lifted again)."""
        assert native is not None
        posted, self._posted = self._posted, None
        if posted is None:
            return
        try:
            _, on_parked_thread, self._protected_at_ns = native.wp_protect_bitmap_finish(
                self._parked_work)
            self.protects_on_parked_thread += on_parked_thread
        finally:
            for view in posted:
                view.release()

    def copy(self, pfns: Any, staging: Any, checksums: Any = None,
             batch_pages: int = 0) -> CopyStats:
        """After resume (blocking: run it in a worker thread): copy the protected pages
        to ``staging`` as they were at ``protect``, and release them all. With
        ``checksums``, the checksum of each frame of ``batch_pages`` staged pages is
        computed as they are copied (see ``gather``)."""
        assert native is not None
        self._protected_at_ns = 0
        try:
            try:
                self._finish_protect()
            finally:
                if self._rearm_due:
                    self._rearm_due = False
                    assert self._rearm is not None
                    self._rearm()
        finally:
            try:
                faults, serve_ns, serve_max_ns, copy_ns = native.wp_copy(
                    self._fd, self._ram, pfns, staging, self.run_pages, self.unit_pages,
                    checksums, batch_pages)
            finally:
                self._holding = False  # wp_copy lifts every protection, even when it fails
        return CopyStats(faults, serve_ns / 1e3, serve_max_ns / 1e3, copy_ns / 1e3,
                         self._protected_at_ns)

    def close(self) -> None:
        if self._capture is not None:
            try:
                self.claim_at_park()
            except OSError:
                pass
        if self._posted is not None:  # never copied: nothing may be left protected
            try:
                self._finish_protect()
            except OSError:
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
