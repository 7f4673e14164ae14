"""Pure-Python versions of the memory functions of ``tremus._native``.

They exist for portability (no compiler, an exotic platform) and as an executable
second reading of the contract in ``tremus/_native.pyi``: the tests run both
implementations and demand byte-identical results and the same error types, so a
bug in either shows up as a disagreement.

Error conventions (shared with the C extension): a wrong kind of object (not a
bytes-like object, not C-contiguous, read-only where it must be written) raises
``TypeError``; a bad length, bound or malformed input raises ``ValueError``.

The KVM functions have no fallback: without the extension there is no micro-VM.
"""

from __future__ import annotations

import operator
import re
import struct
import sys
from array import array
from typing import Any as Buffer  # collections.abc.Buffer is Python 3.12+
from typing import final

import xxhash

__all__ = [
    "PAGE_SIZE",
    "empty_bytearray",
    "dirty_bitmap_to_pfns",
    "dirty_bitmap_to_pfns_into",
    "dirty_bitmap_merge",
    "pfns_ascending_below",
    "gather",
    "scatter",
    "hash64",
    "Hash64",
    "delta_encode",
    "delta_decode",
    "memcpy",
]

PAGE_SIZE = 4096

KIND_RAW = 0
KIND_ZERO = 1
KIND_SAME = 2
KIND_DELTA = 3
_MAX_PAGE_WORDS = 0xFFFF
_U64 = (1 << 64) - 1
_NONZERO_BYTE = re.compile(rb"[^\x00]")
# Bit positions set in each byte value, for bitmap scanning.
_BITS_OF = tuple(tuple(b for b in range(8) if v >> b & 1) for v in range(256))


def _view(obj: Buffer, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte view of ``obj``, with the extension's TypeErrors."""
    try:
        mv = memoryview(obj)
    except TypeError:
        kind = "writable contiguous" if writable else "contiguous"
        raise TypeError(
            f"a {kind} bytes-like object is required, not {type(obj).__name__!r}"
        ) from None
    if writable and mv.readonly:
        raise TypeError(
            f"a writable contiguous bytes-like object is required, not {type(obj).__name__!r}"
        )
    if not mv.c_contiguous:
        raise TypeError("a contiguous bytes-like object is required")
    if mv.format == "B" and mv.ndim == 1:
        return mv
    try:
        return mv.cast("B")
    except TypeError:
        if writable:
            raise
        # Formats memoryview cannot cast (e.g. '<Q' from ctypes): read a copy.
        return memoryview(mv.tobytes())


def _pfn_list(pfns: memoryview) -> array[int]:
    """Little-endian u64 pfns as an array of ints."""
    if len(pfns) % 8:
        raise ValueError(f"pfns length {len(pfns)} is not a multiple of 8")
    arr = array("Q")
    arr.frombytes(pfns)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr


def _pfn_bytes(values: list[int]) -> bytes:
    arr = array("Q", values)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def _check_page_size(page_size: int) -> int:
    page_size = operator.index(page_size)
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, not {page_size}")
    return page_size


def _check_bounds(pfns: array[int], limit: int, what: str) -> None:
    if pfns and max(pfns) >= limit:
        index = next(i for i, p in enumerate(pfns) if p >= limit)
        raise ValueError(f"pfn {pfns[index]} (index {index}) is outside {what} ({limit} pages)")


# -- bitmap ---------------------------------------------------------------------------


def dirty_bitmap_to_pfns(bitmap: Buffer, extra: Buffer | None = None) -> bytes:
    """Set bits of a KVM dirty bitmap (OR ``extra``) as ascending LE u64 pfns.

    Whole-bitmap integer OR, then a regex scan for non-zero bytes, so the Python
    loop only runs over dirty bytes, not over the whole bitmap.
    """
    bm = _view(bitmap)
    data: bytes
    if extra is not None:
        ex = _view(extra, writable=True)
        if len(ex) != len(bm):
            raise ValueError(f"extra has {len(ex)} bytes, bitmap has {len(bm)}")
        n = len(bm)
        data = (int.from_bytes(bm, "little") | int.from_bytes(ex, "little")).to_bytes(n, "little")
        ex[:] = bytes(n)
    else:
        data = bm.tobytes()
    pfns: list[int] = []
    for m in _NONZERO_BYTE.finditer(data):
        base = m.start() * 8
        pfns.extend(base + b for b in _BITS_OF[data[m.start()]])
    return _pfn_bytes(pfns)


def dirty_bitmap_to_pfns_into(bitmap: Buffer, extra: Buffer | None, out: Buffer) -> int:
    """``dirty_bitmap_to_pfns`` into ``out``; returns how many pfns it wrote.
    ``extra`` is zeroed only once they fit."""
    dst = _view(out, writable=True)
    bm = _view(bitmap)
    if extra is not None and len(_view(extra)) != len(bm):
        raise ValueError(f"extra has {len(_view(extra))} bytes, bitmap has {len(bm)}")
    merged = bm if extra is None else (
        int.from_bytes(bm, "little") | int.from_bytes(_view(extra), "little")
    ).to_bytes(len(bm), "little")
    pfns = dirty_bitmap_to_pfns(merged)
    if len(pfns) > len(dst):
        raise ValueError(f"out holds {len(dst) // 8} pfns, {len(pfns) // 8} pages are dirty")
    if extra is not None:
        _view(extra, writable=True)[:] = bytes(len(bm))
    dst[: len(pfns)] = pfns
    return len(pfns) // 8


def dirty_bitmap_merge(bitmap: Buffer, extra: Buffer | None, out: Buffer) -> int:
    """``out`` = ``bitmap`` | ``extra`` (same length), ``extra`` zeroed; the set bits."""
    dst, bm = _view(out, writable=True), _view(bitmap)
    if extra is not None and len(_view(extra)) != len(bm):
        raise ValueError(f"extra has {len(_view(extra))} bytes, bitmap has {len(bm)}")
    if len(dst) != len(bm):
        raise ValueError(f"out has {len(dst)} bytes, bitmap has {len(bm)}")
    merged = int.from_bytes(bm, "little")
    if extra is not None:
        merged |= int.from_bytes(_view(extra), "little")
        _view(extra, writable=True)[:] = bytes(len(bm))
    dst[:] = merged.to_bytes(len(bm), "little")
    return merged.bit_count()


# -- gather / scatter / memcpy ---------------------------------------------------------


def pfns_ascending_below(pfns: Buffer, limit: int, after: int = -1) -> bool:
    """Every pfn is below ``limit``, the first above ``after``, each above the last."""
    pf = _pfn_list(_view(pfns))
    if not pf:
        return True
    return (all(map(operator.lt, pf, pf[1:])) and pf[-1] < limit
            and (after < 0 or pf[0] > after))


def gather(src: Buffer, pfns: Buffer, dst: Buffer, page_size: int = PAGE_SIZE,
           checksums: Buffer | None = None, batch_pages: int = 0) -> int:
    """Copy page ``pfns[i]`` of ``src`` to ``dst[i*page_size:]``; returns bytes copied.
    With ``checksums``, also the checksum of each frame of ``batch_pages`` copied
    pages (little-endian u64 each): hash64(pages, seed=hash64(their pfns))."""
    s, p, d = _view(src), _view(pfns), _view(dst, writable=True)
    ps = _check_page_size(page_size)
    pf = _pfn_list(p)
    n = len(pf)
    sums = None
    if checksums is not None:
        if batch_pages < 1:
            raise ValueError("batch_pages must be at least 1 with checksums")
        sums = _view(checksums, writable=True)
        frames = -(-n // batch_pages)
        if len(sums) < 8 * frames:
            raise ValueError(f"checksums has {len(sums)} bytes, {frames} frames need "
                             f"{8 * frames}")
    if n > len(d) // ps:
        raise ValueError(f"dst has {len(d)} bytes, {n} pages of {ps} need {n * ps}")
    _check_bounds(pf, len(s) // ps, "src")
    for i, pfn in enumerate(pf):
        o = pfn * ps
        d[i * ps : i * ps + ps] = s[o : o + ps]
    if sums is not None:
        for frame, first in enumerate(range(0, n, batch_pages)):
            last = min(first + batch_pages, n)
            seed = hash64(p[8 * first : 8 * last])
            sums[8 * frame : 8 * frame + 8] = hash64(d[first * ps : last * ps], seed).to_bytes(
                8, "little")
    return n * ps


def scatter(dst: Buffer, pfns: Buffer, src: Buffer, page_size: int = PAGE_SIZE) -> int:
    """Inverse of gather: ``src[i*page_size:]`` to page ``pfns[i]`` of ``dst``."""
    d, p, s = _view(dst, writable=True), _view(pfns), _view(src)
    ps = _check_page_size(page_size)
    pf = _pfn_list(p)
    n = len(pf)
    if n > len(s) // ps:
        raise ValueError(f"src has {len(s)} bytes, {n} pages of {ps} need {n * ps}")
    _check_bounds(pf, len(d) // ps, "dst")
    for i, pfn in enumerate(pf):
        o = pfn * ps
        d[o : o + ps] = s[i * ps : i * ps + ps]
    return n * ps


def memcpy(dst: Buffer, src: Buffer) -> int:
    """Copy all of ``src`` to the start of ``dst``; returns ``len(src)``."""
    d, s = _view(dst, writable=True), _view(src)
    if len(d) < len(s):
        raise ValueError(f"dst has {len(d)} bytes, src has {len(s)}")
    d[: len(s)] = s
    return len(s)


# -- hash64 ---------------------------------------------------------------------------
# XXH3-64, as tremus/native/hash.c computes it with the system's libxxhash.


def hash64(data: Buffer, seed: int = 0) -> int:
    """The extension's 64-bit checksum (XXH3-64, seeded), bit for bit."""
    return xxhash.xxh3_64_intdigest(_view(data), seed=operator.index(seed) & _U64)


@final
class Hash64:
    """The extension's ``Hash64``: hash64 fed piece by piece, bit for bit."""

    def __init__(self, seed: int = 0) -> None:
        self._state = xxhash.xxh3_64(seed=operator.index(seed) & _U64)

    def update(self, data: Buffer) -> None:
        self._state.update(_view(data))

    def intdigest(self) -> int:
        return int(self._state.intdigest())


# -- delta coding ---------------------------------------------------------------------
# Mirror of tremus/native/codec.c; the format is documented there and in the stub.


def _check_codec_page_size(page_size: int) -> int:
    ps = _check_page_size(page_size)
    if ps % 4 or ps // 4 > _MAX_PAGE_WORDS:
        raise ValueError(
            f"page_size must be a multiple of 4 of at most {_MAX_PAGE_WORDS * 4} bytes, not {ps}"
        )
    return ps


def _delta(page: bytes, old: bytes, ps: int) -> bytes | None:
    """The DELTA encoding (kind byte included) of page against old, if < 1 + ps bytes."""
    x = (int.from_bytes(page, "little") ^ int.from_bytes(old, "little")).to_bytes(ps, "little")
    diff = [i for i, w in enumerate(memoryview(x).cast("I")) if w]
    runs: list[tuple[int, int]] = []
    start = end = diff[0]
    for k in diff:
        if k - end <= 1:  # contiguous, or a one-word gap absorbed
            end = k + 1
        else:
            runs.append((start, end))
            start, end = k, k + 1
    runs.append((start, end))
    size = 3 + sum(4 + 4 * (e - s) for s, e in runs)
    if size >= 1 + ps:
        return None
    parts = [struct.pack("<BH", KIND_DELTA, len(runs))]
    prev = 0
    for s, e in runs:
        parts.append(struct.pack("<HH", s - prev, e - s))
        parts.append(page[4 * s : 4 * e])
        prev = e
    return b"".join(parts)


def delta_encode(
    pages: Buffer,
    pfns: Buffer,
    cache_tags: Buffer,
    cache_data: Buffer,
    out: Buffer,
    page_size: int = PAGE_SIZE,
) -> int:
    """Page-delta coding against a direct-mapped cache; returns bytes written to ``out``."""
    pg, p = _view(pages), _view(pfns)
    tags, cd, o = (
        _view(cache_tags, writable=True),
        _view(cache_data, writable=True),
        _view(out, writable=True),
    )
    ps = _check_codec_page_size(page_size)
    pf = _pfn_list(p)
    n = len(pf)
    if n > len(pg) // ps:
        raise ValueError(f"pages has {len(pg)} bytes, too few for {n} pages")
    if len(tags) % 8 or not len(tags):
        raise ValueError(f"cache_tags must be a non-empty array of u64 ({len(tags)} bytes)")
    slots = len(tags) // 8
    if slots > len(cd) // ps:
        raise ValueError(f"cache_data has {len(cd)} bytes, {slots} slots need more")
    if n > len(o) // (ps + 1):
        raise ValueError(f"out has {len(o)} bytes, {n} pages need n*(page_size+1)")
    if _U64 in pf:
        raise ValueError(f"pfn at index {list(pf).index(_U64)} is 2**64-1 (no cache tag for it)")
    zero = bytes(ps)
    w = 0
    for i, pfn in enumerate(pf):
        page = pg[i * ps : i * ps + ps].tobytes()
        slot = pfn % slots
        co = slot * ps
        hit = struct.unpack_from("<Q", tags, slot * 8)[0] == pfn + 1
        enc: bytes | None = None
        if page == zero:
            o[w] = KIND_ZERO
            w += 1
        elif hit and cd[co : co + ps] == page:
            o[w] = KIND_SAME
            w += 1
        else:
            if hit:
                enc = _delta(page, cd[co : co + ps].tobytes(), ps)
            if enc is None:
                o[w] = KIND_RAW
                o[w + 1 : w + 1 + ps] = page
                w += 1 + ps
            else:
                o[w : w + len(enc)] = enc
                w += len(enc)
        struct.pack_into("<Q", tags, slot * 8, pfn + 1)
        cd[co : co + ps] = page
    return w


def delta_decode(
    encoded: Buffer, pfns: Buffer, reference: Buffer, out: Buffer, page_size: int = PAGE_SIZE
) -> int:
    """Decode ``delta_encode`` output into ``out``; ValueError on malformed input."""
    e, p, ref, o = _view(encoded), _view(pfns), _view(reference), _view(out, writable=True)
    ps = _check_codec_page_size(page_size)
    pf = _pfn_list(p)
    n = len(pf)
    if n > len(o) // ps:
        raise ValueError(f"out has {len(o)} bytes, too few for {n} pages")
    _check_bounds(pf, len(ref) // ps, "the reference")
    words = ps // 4
    size = len(e)
    ip = 0

    def bad(why: str) -> ValueError:
        return ValueError(f"malformed delta stream at byte {ip}: {why}")

    for i, pfn in enumerate(pf):
        dst = i * ps
        ro = pfn * ps
        if ip >= size:
            raise bad("truncated: missing page kind")
        kind = e[ip]
        ip += 1
        if kind == KIND_RAW:
            if size - ip < ps:
                raise bad("truncated RAW page")
            o[dst : dst + ps] = e[ip : ip + ps]
            ip += ps
        elif kind == KIND_ZERO:
            o[dst : dst + ps] = bytes(ps)
        elif kind == KIND_SAME:
            o[dst : dst + ps] = ref[ro : ro + ps].tobytes()
        elif kind == KIND_DELTA:
            if size - ip < 2:
                raise bad("truncated DELTA header")
            (nruns,) = struct.unpack_from("<H", e, ip)
            ip += 2
            if nruns == 0:
                raise bad("DELTA with no runs")
            o[dst : dst + ps] = ref[ro : ro + ps].tobytes()
            pos = 0
            for _ in range(nruns):
                if size - ip < 4:
                    raise bad("truncated DELTA run header")
                skip, length = struct.unpack_from("<HH", e, ip)
                ip += 4
                if length == 0:
                    raise bad("DELTA run of length 0")
                if skip > words - pos or length > words - pos - skip:
                    raise bad("DELTA run past the end of the page")
                pos += skip
                if size - ip < 4 * length:
                    raise bad("truncated DELTA run data")
                o[dst + 4 * pos : dst + 4 * (pos + length)] = e[ip : ip + 4 * length]
                ip += 4 * length
                pos += length
        else:
            ip -= 1
            raise bad("unknown page kind")
    if ip != size:
        raise bad("trailing bytes after the last page")
    return ip


def empty_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes to be overwritten (zeroed here: Python has no other)."""
    if size < 0:
        raise ValueError("size must not be negative")
    return bytearray(size)
