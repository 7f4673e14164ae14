"""Large buffers that are ready before they are needed."""

from __future__ import annotations

import mmap

__all__ = ["prefaulted_buffer"]


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
