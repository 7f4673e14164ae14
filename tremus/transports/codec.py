"""Page codecs: how a batch of guest pages travels in a PAGES frame.

``raw`` sends pages as they are. ``delta`` is the page-delta coding of legacy Remus
(``tremus/_native.pyi``, ``delta_encode``): the primary keeps a direct-mapped cache
of the pages it sent and sends a changed page as runs of changed 32-bit words, an
unchanged one as one byte. The backup decodes against its replica RAM, which holds
exactly what the primary's cache held as long as every checkpoint was applied. The
coding itself runs in the native helper (``tremus.accel.impl``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Protocol, TypeAlias, final

from tremus.accel import impl

__all__ = [
    "RAW",
    "DELTA",
    "CODECS",
    "MAX_BATCH_PAGES",
    "PageCodec",
    "RawCodec",
    "DeltaCodec",
    "decode_into",
    "encoded_size",
    "split_batches",
]

RAW: Final = "raw"
DELTA: Final = "delta"
CODECS: Final = frozenset({RAW, DELTA})
#: Pages per PAGES frame at most (libxc's batch size): bounds a frame's memory.
MAX_BATCH_PAGES: Final = 1024

BytesLike: TypeAlias = bytes | bytearray | memoryview


class PageCodec(Protocol):
    """The primary's side of a codec."""

    @property
    def name(self) -> str: ...

    def encode(self, pages: BytesLike, pfns: BytesLike) -> BytesLike:
        """Code ``len(pfns) // 8`` pages (``pages`` holds them back to back)."""
        ...

    def reset(self) -> None:
        """Forget history: call it whenever the backup's replica may not match it."""
        ...


def _count(pfns: BytesLike) -> int:
    if len(pfns) % 8:
        raise ValueError(f"pfns is {len(pfns)} bytes, not a whole number of u64")
    return len(pfns) // 8


@final
class RawCodec:
    """Pages as they are; costs nothing on the primary and sends the most."""

    name: Final = RAW

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size

    def encode(self, pages: BytesLike, pfns: BytesLike) -> BytesLike:
        size = _count(pfns) * self.page_size
        if len(pages) < size:
            raise ValueError(f"pages has {len(pages)} bytes, {size} needed")
        return memoryview(pages)[:size]

    def reset(self) -> None:
        pass


@final
class DeltaCodec:
    """Page-delta coding against a direct-mapped cache of ``cache_pages`` pages.

    The cache must see every page the backup's replica receives: send all of a
    connection's pages through one DeltaCodec (it falls back to raw per page by
    itself), and ``reset()`` it for a new connection. A page sent behind its back
    leaves a stale cache entry, and the next delta against it decodes wrong on the
    backup (the CHECKPOINT_END digest then catches it).

    Args:
        cache_pages: cache slots; page ``pfn`` lives in slot ``pfn % cache_pages``.
            The default, 8192 (32 MiB), is legacy Remus's cache size.
        page_size: guest page size in bytes.
    """

    name: Final = DELTA

    def __init__(self, cache_pages: int = 8192, page_size: int = 4096) -> None:
        if cache_pages <= 0:
            raise ValueError(f"cache_pages must be positive, not {cache_pages}")
        self.page_size = page_size
        self.cache_tags = bytearray(8 * cache_pages)
        self.cache_data = bytearray(cache_pages * page_size)
        self._out = bytearray()

    def encode(self, pages: BytesLike, pfns: BytesLike) -> bytes:
        need = _count(pfns) * (self.page_size + 1)
        if len(self._out) < need:
            self._out = bytearray(need)
        written = impl.delta_encode(
            pages, pfns, self.cache_tags, self.cache_data, self._out, self.page_size
        )
        with memoryview(self._out) as view:
            return bytes(view[:written])

    def reset(self) -> None:
        # Tag 0 means "empty": clearing the tags empties the cache.
        self.cache_tags[:] = bytes(len(self.cache_tags))


def encoded_size(codec: str, count: int, page_size: int) -> tuple[int, int]:
    """The smallest and largest valid coded size of ``count`` pages."""
    if codec == RAW:
        return count * page_size, count * page_size
    if codec == DELTA:
        return count, count * (page_size + 1)
    raise ValueError(f"unknown codec {codec!r}")


def decode_into(
    codec: str,
    encoded: BytesLike,
    pfns: BytesLike,
    reference: BytesLike,
    out: BytesLike,
    page_size: int = 4096,
) -> None:
    """Decode ``len(pfns) // 8`` pages into ``out`` (exactly that many pages long).

    ``reference`` (the replica) is only read, and only for delta. Raises ValueError
    if ``encoded`` is malformed, has the wrong length, or names a pfn outside
    ``reference``; ``out`` may then hold a partial result, nothing else is written.
    """
    size = _count(pfns) * page_size
    if len(out) != size:
        raise ValueError(f"out has {len(out)} bytes, {size} expected")
    if codec == RAW:
        if len(encoded) != size:
            raise ValueError(f"raw data is {len(encoded)} bytes, {size} expected")
        memoryview(out)[:] = encoded
    elif codec == DELTA:
        impl.delta_decode(encoded, pfns, reference, out, page_size)
    else:
        raise ValueError(f"unknown codec {codec!r}")


def split_batches(
    pfns: BytesLike,
    pages: BytesLike,
    page_size: int = 4096,
    max_pages: int = MAX_BATCH_PAGES,
) -> Iterator[tuple[memoryview, memoryview]]:
    """Split a checkpoint's pfns and gathered pages into (pfns, pages) frame batches.

    The views share memory with the arguments: nothing is copied.
    """
    count = _count(pfns)
    if len(pages) < count * page_size:
        raise ValueError(f"pages has {len(pages)} bytes, {count} pages need {count * page_size}")
    pv, dv = memoryview(pfns).cast("B"), memoryview(pages).cast("B")
    for start in range(0, count, max_pages):
        stop = min(start + max_pages, count)
        yield pv[8 * start : 8 * stop], dv[start * page_size : stop * page_size]
