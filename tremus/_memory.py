"""Large buffers that are ready before they are needed."""

from __future__ import annotations

import ctypes
import mmap

from tremus.accel import impl

__all__ = ["page_aligned", "prefaulted_buffer"]

_PAGE = mmap.PAGESIZE


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
    raw = impl.empty_bytearray(size + _PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = (-address - aligned_at) % _PAGE
    return memoryview(raw)[start : start + size]
