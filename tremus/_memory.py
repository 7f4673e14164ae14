"""Large buffers that are ready before they are needed."""

from __future__ import annotations

import ctypes
import errno
import mmap
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import final

from tremus.accel import impl

__all__ = ["GuestMemory", "PayloadBuffers", "guest_memory", "page_aligned", "prefaulted_buffer"]

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: A transparent huge page on x86-64 (the PMD size).
HUGE_PAGE = 2 << 20


def prefaulted_buffer(size: int) -> mmap.mmap:
    """``size`` zero bytes of anonymous memory, mapped in up front (MAP_POPULATE).

    Staging buffers and replicas are as large as guest RAM. Left to fault in lazily,
    the first full checkpoint would pay a page fault for every page inside the guest's
    pause (on the primary) or between receiving and acknowledging (on the backup) —
    seconds for a large guest, long enough to look like a dead peer.
    """
    if size == 0:
        return mmap.mmap(-1, 1)  # an empty mapping is not allowed; never read
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, size, flags=flags)


def page_aligned(size: int, aligned_at: int = 0) -> memoryview:
    """``size`` writable bytes, not zeroed, whose byte ``aligned_at`` is on a page
    boundary (a frame payload's pages follow its pfns).

    Copying pages to an address exactly 16 bytes past their source modulo 4096
    measured ~3.4x slower here than any other offset (memcpy's 4K-aliasing slow
    path; 0, 32, 48 or -16 are all fast). A bytearray's bytes start 16 bytes past
    a page boundary, so a frame payload in one, whose pages follow ``8 * count``
    bytes of pfns, hits it for some counts when its pages are scattered into the
    page-aligned replica. With the pages page-aligned it never does.
    """
    return _aligned_in(impl.empty_bytearray(size + _PAGE), size, aligned_at)


def _aligned_in(raw: bytearray, size: int, aligned_at: int) -> memoryview:
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = (-address - aligned_at) % _PAGE
    return memoryview(raw)[start : start + size]


class _Lent(bytearray):
    """A buffer ``PayloadBuffers`` lent out (weakly tracked: one never given back is
    simply freed)."""

    __slots__ = ("__weakref__",)


@final
class PayloadBuffers:
    """Page-aligned buffers (as ``page_aligned``) for received frame payloads, used
    again once given back.

    A fresh buffer of a few MiB is mapped in by the kernel a page at a time as the
    bytes land in it, a fault and a zeroed page each (about as long as receiving the
    bytes, here); and the allocator hands large freed buffers back to the kernel. One
    given back is used again, already mapped in. At most ``max_bytes`` wait unused.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._spare: list[_Lent] = []
        self._spare_bytes = 0
        self._lent: weakref.WeakValueDictionary[int, _Lent] = weakref.WeakValueDictionary()

    def take(self, size: int, aligned_at: int = 0) -> memoryview:
        """``size`` writable bytes (not zeroed), byte ``aligned_at`` page-aligned."""
        need = size + _PAGE
        for index, raw in enumerate(self._spare):
            if need <= len(raw) <= 2 * need:
                del self._spare[index]
                self._spare_bytes -= len(raw)
                break
        else:
            raw = _Lent(need)  # calloc: fresh pages from the kernel, not written here
        self._lent[id(raw)] = raw
        return _aligned_in(raw, size, aligned_at)

    def give_back(self, buffers: Iterable[object]) -> None:
        """Buffers ``take`` lent (``memoryview.obj`` of what it returned) that nothing
        reads any more; anything else is ignored."""
        for obj in buffers:
            raw = self._lent.get(id(obj))
            if raw is None or raw is not obj:
                continue
            del self._lent[id(obj)]
            if self._spare_bytes + len(raw) <= self.max_bytes:
                self._spare.append(raw)
                self._spare_bytes += len(raw)


@dataclass(frozen=True, slots=True)
class GuestMemory:
    """A guest's RAM: the mapping, and how many of its bytes the kernel backs with
    transparent huge pages (``huge_bytes``; ``huge_page`` is their size)."""

    mapping: mmap.mmap
    huge_bytes: int
    huge_page: int = HUGE_PAGE

    @property
    def mostly_huge(self) -> bool:
        """Nine tenths or more of it is in huge pages: write-protecting it a huge
        page at a time (one page-table entry each) is what pays."""
        return self.huge_bytes * 10 >= len(self.mapping) * 9


def guest_memory(size: int) -> GuestMemory:
    """``size`` bytes of anonymous memory for a guest's RAM, allocated now, in
    transparent huge pages where the kernel gives them.

    Allocated up front: the first (full) checkpoint copies all of it inside a
    pause, a page allocated on first touch there costs ~6x a copied one, and a
    guest that cannot have its RAM fails here, not mid-run. Huge pages make
    userfaultfd write-protection one page-table entry per 2 MiB (~20x cheaper in
    the pause than 4 KiB entries). Not inherited across fork: no child process
    ever shares (and copy-on-write faults) the guest's pages.
    """
    ram = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for advice in (mmap.MADV_DONTFORK, mmap.MADV_HUGEPAGE):
            try:
                ram.madvise(advice)
            except OSError:
                pass  # a kernel without THP: 4 KiB pages
        try:
            ram.madvise(_MADV_POPULATE_WRITE)
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise
            for offset in range(0, size, _PAGE):  # older than Linux 5.14: touch them
                ram[offset] = 0
    except BaseException:
        ram.close()
        raise
    address = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    return GuestMemory(ram, _huge_bytes(address, size))


def _huge_bytes(address: int, size: int) -> int:
    """Bytes of [address, address + size) in anonymous huge pages, from smaps (pro
    rata where the kernel merged the mapping with a neighbour)."""
    try:
        with open("/proc/self/smaps") as smaps:
            text = smaps.read()
    except OSError:
        return 0
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ", re.M)
    total = 0
    for match in header.finditer(text):
        start, end = int(match[1], 16), int(match[2], 16)
        if end <= address or start >= address + size:
            continue
        body = text[match.end(): text.find("\nVmFlags", match.end())]
        huge = re.search(r"^AnonHugePages:\s+(\d+) kB", body, re.M)
        if huge:
            # A mapping next to one like it may share its entry: take its share.
            overlap = min(end, address + size) - max(start, address)
            total += int(huge[1]) * 1024 * overlap // (end - start)
    return min(total, size)
