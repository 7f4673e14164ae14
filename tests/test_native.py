"""The native helper and its pure-Python fallback: each against simple reference
semantics, and against each other byte for byte (tremus/_native.pyi is the contract)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from array import array
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tremus import _pyfallback as fallback
from tremus import accel

native = accel.native
needs_native = pytest.mark.skipif(native is None, reason="tremus._native is not built")

IMPLS = [
    pytest.param(native, id="native", marks=needs_native),
    pytest.param(fallback, id="python"),
]
BOTH = [m for m in (native, fallback) if m is not None]

RAW, ZERO, SAME, DELTA = 0, 1, 2, 3


def pfn_bytes(pfns: list[int]) -> bytes:
    return struct.pack(f"<{len(pfns)}Q", *pfns)


def pfn_list(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def ref_bitmap_pfns(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


# -- accel ------------------------------------------------------------------------------


def test_accel_picks_native_unless_told_otherwise() -> None:
    if os.environ.get("TREMUS_PURE_PYTHON") == "1" or native is None:
        assert accel.impl is fallback
    else:
        assert accel.impl is native
    assert accel.fallback is fallback


def test_accel_env_forces_fallback() -> None:
    code = "from tremus import accel; print(accel.impl.__name__, accel.using_native)"
    env = dict(os.environ, TREMUS_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.split() == ["tremus._pyfallback", "False"]


# -- dirty_bitmap_to_pfns ---------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 64, 4096])
def test_bitmap_to_pfns_matches_reference(impl: ModuleType, length: int) -> None:
    rng = random.Random(length)
    for density in (0.0, 0.01, 0.5, 1.0):
        bm = bytes(sum(1 << b for b in range(8) if rng.random() < density) for _ in range(length))
        out = impl.dirty_bitmap_to_pfns(bm)
        assert isinstance(out, bytes)
        assert pfn_list(out) == ref_bitmap_pfns(bm)


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_high_bits_and_extra(impl: ModuleType) -> None:
    bm = bytearray(24)
    bm[7] = 0x80  # bit 63 of word 0
    bm[23] = 0x80  # bit 63 of word 2: pfn 191
    extra = bytearray(24)
    extra[0] = 0x01
    extra[7] = 0x80  # overlaps bm: reported once
    extra[16] = 0x03
    out = pfn_list(impl.dirty_bitmap_to_pfns(bytes(bm), extra))
    assert out == [0, 63, 128, 129, 191]
    assert extra == bytearray(24), "extra must be zeroed"
    assert pfn_list(impl.dirty_bitmap_to_pfns(b"\xff" * 8)) == list(range(64))


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_empty_and_errors(impl: ModuleType) -> None:
    assert impl.dirty_bitmap_to_pfns(b"") == b""
    assert impl.dirty_bitmap_to_pfns(bytes(800), bytearray(800)) == b""
    with pytest.raises(ValueError):
        impl.dirty_bitmap_to_pfns(bytes(16), bytearray(8))
    with pytest.raises(TypeError):
        impl.dirty_bitmap_to_pfns(bytes(8), bytes(8))  # extra must be writable
    with pytest.raises(TypeError):
        impl.dirty_bitmap_to_pfns("not a buffer")


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_to_pfns_into_a_buffer(impl: ModuleType) -> None:
    """Into a reused buffer: whole dirty words, partial ones and ``extra`` as the
    bytes version gives them; pfns that do not fit are refused with ``extra`` kept."""
    rng = random.Random(7)
    bm = bytearray(b"\xff" * 24 + bytes(rng.randrange(256) for _ in range(40)) + b"\xff" * 8)
    extra = bytearray(len(bm))
    extra[30] = 0x10
    expected = impl.dirty_bitmap_to_pfns(bytes(bm), bytearray(extra))
    out = bytearray(8 * 8 * len(bm) + 24)
    out[-8:] = b"untouch!"
    count = impl.dirty_bitmap_to_pfns_into(bm, extra, out)
    assert out[: 8 * count] == expected and out[-8:] == b"untouch!"
    assert extra == bytes(len(bm))
    kept = bytearray(b"\x10")
    with pytest.raises(ValueError, match="out holds 3 pfns"):
        impl.dirty_bitmap_to_pfns_into(b"\x0f", kept, bytearray(24))
    assert kept == b"\x10"
    assert impl.dirty_bitmap_to_pfns_into(b"\x0f", None, bytearray(32)) == 4


@pytest.mark.skipif(len(BOTH) < 2, reason="tremus._native is not built")
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_bitmap_impls_agree(a: bytes, b: bytes) -> None:
    n = min(len(a), len(b))
    results = []
    for impl in BOTH:
        extra = bytearray(b[:n])
        results.append(impl.dirty_bitmap_to_pfns(a[:n], extra))
        assert extra == bytes(n)
    assert results[0] == results[1]
    assert pfn_list(results[0]) == ref_bitmap_pfns(
        bytes(x | y for x, y in zip(a[:n], b[:n], strict=True))
    )


# -- gather / scatter / memcpy ----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ps", [4096, 512, 8])
def test_gather_scatter_round_trip(impl: ModuleType, ps: int) -> None:
    rng = random.Random(ps)
    npages = 64
    src = bytes(rng.getrandbits(8) for _ in range(npages * ps))
    pfns = sorted(rng.sample(range(npages), 20)) + [5, 5]  # duplicates are allowed
    staged = bytearray(len(pfns) * ps + 7)  # bigger than needed is fine
    assert impl.gather(src, pfn_bytes(pfns), staged, ps) == len(pfns) * ps
    for i, p in enumerate(pfns):
        assert staged[i * ps : (i + 1) * ps] == src[p * ps : (p + 1) * ps]
    assert staged[len(pfns) * ps :] == bytes(7)

    replica = bytearray(npages * ps)
    assert impl.scatter(replica, pfn_bytes(pfns), staged, ps) == len(pfns) * ps
    for p in range(npages):
        want = src[p * ps : (p + 1) * ps] if p in pfns else bytes(ps)
        assert replica[p * ps : (p + 1) * ps] == want
    assert impl.gather(src, b"", bytearray(0), ps) == 0


def frame_checksums(pfns: bytes, staged: bytes, batch_pages: int, ps: int = 4096) -> list[int]:
    """What a PAGES frame of each batch carries: hash64(pages, seed=hash64(pfns))."""
    count = len(pfns) // 8
    return [fallback.hash64(staged[first * ps : min(first + batch_pages, count) * ps],
                            fallback.hash64(pfns[8 * first : 8 * min(first + batch_pages, count)]))
            for first in range(0, count, batch_pages)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("count", "batch_pages"), [(1, 1024), (7, 3), (9, 3), (300, 64),
                                                    (2048, 1024), (0, 4)])
def test_gather_computes_frame_checksums_as_it_copies(impl: ModuleType, count: int,
                                                      batch_pages: int) -> None:
    rng = random.Random(count)
    npages = 2 * count + 3
    src = os.urandom(npages * 4096)
    pfns = pfn_bytes(sorted(rng.sample(range(npages), count)))
    staged = bytearray(count * 4096)
    sums = bytearray(8 * -(-count // batch_pages) + 8)
    sums[-8:] = b"untouch!"
    impl.gather(src, pfns, staged, 4096, sums, batch_pages)
    want = frame_checksums(pfns, bytes(staged), batch_pages)
    assert pfn_list(bytes(sums[: 8 * len(want)])) == want
    assert sums[-8:] == b"untouch!"


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_refuses_a_checksum_buffer_it_cannot_fill(impl: ModuleType) -> None:
    src, staged = os.urandom(8 * 4096), bytearray(5 * 4096)
    pfns = pfn_bytes([0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="checksums has 8 bytes, 2 frames need 16"):
        impl.gather(src, pfns, staged, 4096, bytearray(8), 4)
    with pytest.raises(ValueError, match="batch_pages"):
        impl.gather(src, pfns, staged, 4096, bytearray(16), 0)
    with pytest.raises((TypeError, BufferError)):
        impl.gather(src, pfns, staged, 4096, bytes(16), 4)  # not writable


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nbytes", [8, 13, 256])
def test_dirty_bitmap_merge(impl: ModuleType, nbytes: int) -> None:
    rng = random.Random(nbytes)
    bitmap = bytes(rng.getrandbits(8) for _ in range(nbytes))
    extra = bytearray(rng.getrandbits(8) & 0x11 for _ in range(nbytes))
    want = bytes(b | e for b, e in zip(bitmap, extra, strict=True))
    out = bytearray(nbytes)
    assert impl.dirty_bitmap_merge(bitmap, extra, out) == sum(bin(b).count("1") for b in want)
    assert out == want and extra == bytes(nbytes)
    assert impl.dirty_bitmap_merge(bitmap, None, out) == sum(bin(b).count("1") for b in bitmap)
    assert out == bitmap
    with pytest.raises(ValueError):
        impl.dirty_bitmap_merge(bitmap, bytearray(nbytes + 1), out)
    with pytest.raises(ValueError):
        impl.dirty_bitmap_merge(bitmap, None, bytearray(nbytes + 8))


@pytest.mark.parametrize("impl", IMPLS)
def test_pfns_ascending_below(impl: ModuleType) -> None:
    ok = pfn_bytes([3, 7, 8, 1000])
    assert impl.pfns_ascending_below(ok, 1001)
    assert impl.pfns_ascending_below(ok, 1001, 2)
    assert not impl.pfns_ascending_below(ok, 1001, 3)  # must follow ``after``
    assert not impl.pfns_ascending_below(ok, 1000)  # the last is out of range
    assert not impl.pfns_ascending_below(pfn_bytes([3, 7, 7, 9]), 10)  # repeated
    assert not impl.pfns_ascending_below(pfn_bytes([3, 9, 7, 8]), 10)  # goes back
    assert not impl.pfns_ascending_below(pfn_bytes([2**64 - 1]), 2**64 - 1)
    assert impl.pfns_ascending_below(b"", 0)
    big = list(range(0, 3000, 3))
    assert impl.pfns_ascending_below(pfn_bytes(big), 3000)
    for bad in (17, 500, 999):
        broken = big.copy()
        broken[bad] = broken[bad - 1]
        assert not impl.pfns_ascending_below(pfn_bytes(broken), 3000)
    with pytest.raises(ValueError):
        impl.pfns_ascending_below(b"1234567", 10)


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_scatter_accept_any_contiguous_buffer(impl: ModuleType) -> None:
    src = array("Q", range(1024))  # 2 pages of u64
    dst = mmap.mmap(-1, 4096)
    assert impl.gather(memoryview(src), array("Q", [1]), dst) == 4096
    assert dst[:] == src.tobytes()[4096:]


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_scatter_bounds(impl: ModuleType) -> None:
    ps = 4096
    ram = bytearray(os.urandom(4 * ps))
    dst = bytearray(2 * ps)
    # pfn out of range: nothing written, even for the pages before it
    with pytest.raises(ValueError):
        impl.gather(ram, pfn_bytes([0, 4]), dst)
    assert dst == bytearray(2 * ps)
    with pytest.raises(ValueError):
        impl.gather(ram, pfn_bytes([2**64 - 1]), dst)
    before = bytes(ram)
    with pytest.raises(ValueError):
        impl.scatter(ram, pfn_bytes([1, 4]), bytes(2 * ps))
    assert ram == before
    # dst / src too small
    with pytest.raises(ValueError):
        impl.gather(ram, pfn_bytes([0, 1, 2]), dst)
    with pytest.raises(ValueError):
        impl.scatter(ram, pfn_bytes([0, 1]), bytes(ps))
    # ragged pfn array, bad page size
    with pytest.raises(ValueError):
        impl.gather(ram, b"\0" * 7, dst)
    with pytest.raises(ValueError):
        impl.gather(ram, pfn_bytes([0]), dst, 0)
    # read-only or non-contiguous destinations
    with pytest.raises(TypeError):
        impl.gather(ram, pfn_bytes([0]), bytes(ps))
    with pytest.raises(TypeError):
        impl.scatter(bytes(ram), pfn_bytes([0]), bytes(ps))
    with pytest.raises(TypeError):
        impl.gather(ram, pfn_bytes([0]), memoryview(bytearray(2 * ps))[::2])


@pytest.mark.parametrize("impl", IMPLS)
def test_memcpy(impl: ModuleType) -> None:
    dst = bytearray(10)
    assert impl.memcpy(dst, b"abcdef") == 6
    assert dst == bytearray(b"abcdef\0\0\0\0")
    assert impl.memcpy(dst, b"") == 0
    with pytest.raises(ValueError):
        impl.memcpy(bytearray(3), b"abcd")
    with pytest.raises(TypeError):
        impl.memcpy(b"xxxxxx", b"ab")


# -- hash64 -----------------------------------------------------------------------------


def _pattern(n: int) -> bytes:
    return bytes((i * 131 + 7) & 0xFF for i in range(n))


@pytest.mark.skipif(len(BOTH) < 2, reason="tremus._native is not built")
@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**64 - 1])
def test_hash64_impls_agree_for_all_small_lengths(seed: int) -> None:
    data = _pattern(300)
    assert native is not None
    for n in range(301):
        assert native.hash64(data[:n], seed) == fallback.hash64(data[:n], seed), n


@pytest.mark.skipif(len(BOTH) < 2, reason="tremus._native is not built")
@pytest.mark.parametrize("n", [4096, 4096 * 16 + 13, (1 << 20) + 5])
def test_hash64_impls_agree_on_large_inputs(n: int) -> None:
    data = random.Random(n).randbytes(n)
    assert native is not None
    assert native.hash64(data) == fallback.hash64(data)
    assert native.hash64(data, 12345) == fallback.hash64(data, 12345)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 7, -1, 2**64 + 3])
def test_hash64_fed_piece_by_piece_is_hash64(impl: ModuleType, seed: int) -> None:
    rng = random.Random(seed & 0xFFFF)
    data = rng.randbytes(300_000)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(data)), rng.randint(0, 6)))
        running = impl.Hash64(seed)
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            running.update(memoryview(data)[start:end])
        assert running.intdigest() == impl.hash64(data, seed) == fallback.hash64(data, seed)
    assert impl.Hash64().intdigest() == impl.hash64(b"")
    with pytest.raises(TypeError):
        impl.Hash64(1).update("text")


@pytest.mark.parametrize("impl", IMPLS)
def test_hash64_properties(impl: ModuleType) -> None:
    assert impl.hash64(b"tremus") == impl.hash64(bytearray(b"tremus"))
    assert impl.hash64(b"tremus", -1) == impl.hash64(b"tremus", 2**64 - 1)
    assert impl.hash64(b"tremus", 0) != impl.hash64(b"tremus", 1)
    assert impl.hash64(b"") != impl.hash64(b"\0")
    assert impl.hash64(array("Q", [1, 2])) == impl.hash64(pfn_bytes([1, 2]))
    data = bytearray(_pattern(100))
    h = impl.hash64(data)
    assert 0 <= h < 2**64
    seen = {h}
    for bit in range(0, 800, 7):  # every single-bit flip changes the hash
        data[bit // 8] ^= 1 << (bit % 8)
        seen.add(impl.hash64(data))
        data[bit // 8] ^= 1 << (bit % 8)
    assert len(seen) == 1 + len(range(0, 800, 7))
    with pytest.raises(TypeError):
        impl.hash64("text")
    with pytest.raises(TypeError):
        impl.hash64(b"x", 1.5)


HASH_SIZES = [0, 1, 3, 4, 8, 16, 17, 128, 129, 240, 241, 4096, 1 << 20]
HASH_SEEDS = [0, 1, 2**63, 2**64 - 1]


@pytest.mark.skipif(len(BOTH) < 2, reason="tremus._native is not built")
@pytest.mark.parametrize("n", HASH_SIZES)
def test_hash64_impls_agree_on_random_inputs(n: int) -> None:
    # XXH3 has a code path per length class (0, 1-3, 4-8, 9-16, 17-128, 129-240,
    # longer); the sizes straddle their bounds, and 4096 is where the GIL goes.
    rng = random.Random(n)
    assert native is not None
    for _ in range(3 if n < 4096 else 1):
        data = rng.randbytes(n)
        for seed in HASH_SEEDS:
            assert native.hash64(data, seed) == fallback.hash64(data, seed), (n, seed)
            assert native.hash64(data, seed=seed) == fallback.hash64(data, seed=seed)


_PRIME32 = 2654435761
_PRIME64 = 11400714785074694797


def _xxhash_sanity_buffer(n: int) -> bytes:
    """The xxHash project's self-test input: byte i is the top byte of PRIME32*PRIME64**i."""
    out = bytearray(n)
    gen = _PRIME32
    for i in range(n):
        out[i] = gen >> 56
        gen = gen * _PRIME64 & (2**64 - 1)
    return bytes(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_hash64_is_xxh3_64(impl: ModuleType) -> None:
    # XXH3_64bits_withSeed self-test vectors of the xxHash project (its xxhsum
    # sanity check, stable since xxHash 0.8.0): one length per code path.
    buf = _xxhash_sanity_buffer(2367)
    vectors = {
        (0, 0): 0x2D06800538D394C2,
        (0, _PRIME64): 0xA8A6B918B2F0364A,
        (1, 0): 0xC44BDFF4074EECDB,
        (1, _PRIME64): 0x032BE332DD766EF8,
        (6, 0): 0x27B56A84CD2D7325,
        (6, _PRIME64): 0x84589C116AB59AB9,
        (12, 0): 0xA713DAF0DFBB77E7,
        (12, _PRIME64): 0xE7303E1B2336DE0E,
        (24, 0): 0xA3FE70BF9D3510EB,
        (24, _PRIME64): 0x850E80FC35BDD690,
        (48, 0): 0x397DA259ECBA1F11,
        (48, _PRIME64): 0xADC2CBAA44ACC616,
        (80, 0): 0xBCDEFBBB2C47C90A,
        (80, _PRIME64): 0xC6DD0CB699532E73,
        (195, 0): 0xCD94217EE362EC3A,
        (195, _PRIME64): 0xBA68003D370CB3D9,
        (403, 0): 0xCDEB804D65C6DEA4,
        (403, _PRIME64): 0x6259F6ECFD6443FD,
        (512, 0): 0x617E49599013CB6B,
        (512, _PRIME64): 0x3CE457DE14C27708,
        (2048, 0): 0xDD59E2C3A5F038E0,
        (2048, _PRIME64): 0x66F81670669ABABC,
        (2240, 0): 0x6E73A90539CF2948,
        (2240, _PRIME64): 0x757BA8487D1B5247,
        (2367, 0): 0xCB37AEB9E5D361ED,
        (2367, _PRIME64): 0xD2DB3415B942B42A,
    }
    got = {(n, seed): impl.hash64(buf[:n], seed) for n, seed in vectors}
    assert got == vectors
    assert impl.hash64(b"") == 0x2D06800538D394C2  # default seed is 0


@pytest.mark.parametrize("impl", IMPLS)
def test_hash64_known_answers(impl: ModuleType) -> None:
    # Pinned: checksums are on the wire, so a change to the algorithm (in both
    # implementations) must be deliberate. Fixed input bytes also pin endianness;
    # the long inputs take the GIL-releasing path of the extension.
    expected = {
        (b"tremus", 0): 0x90C78DF5261943A7,
        (bytes(range(256)), 0): 0x9408A4433B952D71,
        (bytes(range(256)), 2**64 - 1): 0xB572A71CA2BAE1E8,
        (bytes(range(256)) * 17, 2**63): 0x49B4CE72B3EB893B,
        (bytes(range(256)) * 4096, 1): 0x94F6A4FED326C421,
    }
    assert {k: impl.hash64(*k) for k in expected} == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_hash64_takes_any_contiguous_buffer(impl: ModuleType) -> None:
    data = random.Random(3).randbytes((1 << 20) + 5)
    want = impl.hash64(data, 7)
    assert impl.hash64(memoryview(data), 7) == want
    assert impl.hash64(bytearray(data), seed=7) == want
    with mmap.mmap(-1, len(data)) as region:
        region[:] = data
        assert impl.hash64(region, 7) == want
        with memoryview(region) as mv:
            assert impl.hash64(mv[100:5000], 7) == impl.hash64(data[100:5000], 7)
            assert impl.hash64(mv[:0], 7) == impl.hash64(b"", 7)
    # Multi-byte formats are hashed as their bytes.
    words = array("Q", range(1000))
    assert impl.hash64(words) == impl.hash64(words.tobytes())
    assert impl.hash64(memoryview(words).cast("B")) == impl.hash64(words.tobytes())
    with pytest.raises(TypeError):
        impl.hash64(memoryview(data)[::2])  # not contiguous


# -- delta coding -----------------------------------------------------------------------


class Codec:
    """One side's encoder state (cache) around an implementation."""

    def __init__(self, impl: ModuleType, slots: int, ps: int) -> None:
        self.impl, self.ps = impl, ps
        self.tags = bytearray(8 * slots)
        self.data = bytearray(slots * ps)

    def encode(self, pages: bytes, pfns: list[int]) -> bytes:
        out = bytearray(len(pfns) * (self.ps + 1))
        n = self.impl.delta_encode(pages, pfn_bytes(pfns), self.tags, self.data, out, self.ps)
        return bytes(out[:n])


def decode(impl: ModuleType, enc: bytes, pfns: list[int], ref: bytes, ps: int) -> bytes:
    out = bytearray(len(pfns) * ps)
    assert impl.delta_decode(enc, pfn_bytes(pfns), ref, out, ps) == len(enc)
    return bytes(out)


def kinds(enc: bytes, n: int, ps: int) -> list[int]:
    """Reference parser of the stream format: the kind of each page."""
    out, ip = [], 0
    for _ in range(n):
        k = enc[ip]
        ip += 1
        out.append(k)
        if k == RAW:
            ip += ps
        elif k == DELTA:
            (nruns,) = struct.unpack_from("<H", enc, ip)
            ip += 2
            for _ in range(nruns):
                _skip, length = struct.unpack_from("<HH", enc, ip)
                ip += 4 + 4 * length
    assert ip == len(enc)
    return out


def words(*values: int, n: int = 16) -> bytes:
    w = list(values) + [0] * (n - len(values))
    return struct.pack(f"<{n}I", *w)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_format_by_hand(impl: ModuleType) -> None:
    ps = 64  # 16 words
    base = words(*range(1, 17))
    c = Codec(impl, 4, ps)
    assert c.encode(base, [5]) == bytes([RAW]) + base  # miss
    assert c.tags[8:16] == (6).to_bytes(8, "little")  # slot 5 % 4 = 1 holds pfn+1
    assert c.data[ps : 2 * ps] == base
    assert c.encode(base, [5]) == bytes([SAME])
    # words 1 and 3 differ: one run over the one-word gap
    v2 = bytearray(base)
    v2[4:8] = b"\xaa" * 4
    v2[12:16] = b"\xbb" * 4
    assert c.encode(bytes(v2), [5]) == (
        bytes([DELTA]) + struct.pack("<HHH", 1, 1, 3) + bytes(v2[4:16])
    )
    # words 1 and 5 differ (three equal between): two runs, skip counted from the run end
    v3 = bytearray(v2)
    v3[4:8] = b"\x01" * 4
    v3[20:24] = b"\x02" * 4
    assert c.encode(bytes(v3), [5]) == bytes([DELTA]) + struct.pack("<HHH", 2, 1, 1) + bytes(
        v3[4:8]
    ) + struct.pack("<HH", 3, 1) + bytes(v3[20:24])
    # a delta that would not be smaller than the page is sent RAW
    v4 = bytes(b ^ 0xFF for b in v3)
    assert c.encode(v4, [5]) == bytes([RAW]) + v4
    # zero page, then a zero page again (ZERO wins over SAME)
    assert c.encode(bytes(ps), [5]) == bytes([ZERO])
    assert c.encode(bytes(ps), [5]) == bytes([ZERO])
    # slot conflict: pfn 1 evicts pfn 5 from slot 1; same content is still a miss
    assert c.encode(base, [1]) == bytes([RAW]) + base
    assert c.encode(base, [5]) == bytes([RAW]) + base
    # decoding all of it against a reference gives the pages back
    ref = bytearray(8 * ps)
    ref[5 * ps : 6 * ps] = base
    enc = bytes([SAME, DELTA]) + struct.pack("<HHH", 1, 1, 3) + bytes(v2[4:16])
    assert decode(impl, enc, [5, 5], bytes(ref), ps) == base + bytes(v2)


@st.composite
def delta_scenarios(draw: st.DrawFn) -> tuple[int, int, int, list[list[tuple[int, str]]], int]:
    ps = draw(st.sampled_from([16, 64, 256, 4096]))
    npages = draw(st.integers(1, 10))
    slots = draw(st.integers(1, 6))
    epochs = [
        [
            (pfn, draw(st.sampled_from(["random", "zero", "same", "few", "block", "sparse"])))
            for pfn in sorted(draw(st.sets(st.integers(0, npages - 1), max_size=npages)))
        ]
        for _ in range(draw(st.integers(1, 5)))
    ]
    seed = draw(st.integers(0, 2**32))
    return ps, npages, slots, epochs, seed


def mutate(page: bytes, how: str, rng: random.Random) -> bytes:
    ps = len(page)
    nwords = ps // 4
    if how == "random":
        return rng.randbytes(ps)
    if how == "zero":
        return bytes(ps)
    if how == "same":
        return page
    b = bytearray(page)
    if how == "few":
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(ps)
            b[i] ^= rng.randint(1, 255)
    elif how == "block":
        start = rng.randrange(nwords)
        end = rng.randint(start + 1, min(nwords, start + 8))
        b[4 * start : 4 * end] = rng.randbytes(4 * (end - start))
    else:  # sparse: every k-th word, k in 1..3 (gaps of 0, 1, 2 words)
        k = rng.randint(1, 3)
        for w in range(rng.randrange(k), nwords, k):
            b[4 * w] ^= 0x5A
    return bytes(b)


@given(delta_scenarios())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_delta_round_trip_and_impls_agree(
    scenario: tuple[int, int, int, list[list[tuple[int, str]]], int],
) -> None:
    ps, npages, slots, epochs, seed = scenario
    rng = random.Random(seed)
    ram = [rng.randbytes(ps) if rng.random() < 0.7 else bytes(ps) for _ in range(npages)]
    codecs = [Codec(impl, slots, ps) for impl in BOTH]
    replica = bytearray(npages * ps)
    for epoch in epochs:
        for pfn, how in epoch:
            ram[pfn] = mutate(ram[pfn], how, rng)
        pfns = [pfn for pfn, _ in epoch]
        pages = b"".join(ram[p] for p in pfns)
        encoded = [c.encode(pages, pfns) for c in codecs]
        assert all(e == encoded[0] for e in encoded), "encoders differ"
        assert all(c.tags == codecs[0].tags and c.data == codecs[0].data for c in codecs)
        enc = encoded[0]
        assert len(enc) <= len(pfns) * (ps + 1)
        ks = kinds(enc, len(pfns), ps)
        for k, (pfn, _how) in zip(ks, epoch, strict=True):
            event(f"page kind {k}")
            if k == ZERO:
                assert ram[pfn] == bytes(ps)
        for impl in BOTH:
            assert decode(impl, enc, pfns, bytes(replica), ps) == pages
        BOTH[0].scatter(replica, pfn_bytes(pfns), pages, ps)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_encode_errors(impl: ModuleType) -> None:
    ps = 64
    page, pf = bytes(range(64)), pfn_bytes([1])
    ok = dict(cache_tags=bytearray(16), cache_data=bytearray(2 * ps), out=bytearray(ps + 1))
    assert impl.delta_encode(page, pf, page_size=ps, **ok) == ps + 1
    bad_cases = [
        dict(ok, out=bytearray(ps)),  # out < n*(ps+1), even if RAW would fit otherwise
        dict(ok, cache_data=bytearray(ps)),  # 2 slots, 1 page of data
        dict(ok, cache_tags=bytearray(12)),
        dict(ok, cache_tags=bytearray(0)),
    ]
    for kw in bad_cases:
        with pytest.raises(ValueError):
            impl.delta_encode(page, pf, page_size=ps, **kw)
    with pytest.raises(ValueError):
        impl.delta_encode(page, pfn_bytes([2**64 - 1]), page_size=ps, **ok)
    with pytest.raises(ValueError):
        impl.delta_encode(page, pfn_bytes([1, 2]), page_size=ps, **ok)  # pages too short
    for bad_ps in (0, 6, 4 * 0x10000):
        with pytest.raises(ValueError):
            impl.delta_encode(page, pf, page_size=bad_ps, **ok)
    with pytest.raises(TypeError):
        impl.delta_encode(page, pf, bytes(16), bytearray(2 * ps), bytearray(ps + 1), ps)


def _valid_stream(ps: int = 64) -> tuple[bytes, list[int], bytes, bytes]:
    """A stream holding every kind, its pfns, reference and decoded pages."""
    rng = random.Random(7)
    ref = bytearray(rng.randbytes(4 * ps))
    changed = bytearray(ref[ps : 2 * ps])
    changed[8:12] = b"\xee\xee\xee\xee"
    pages = [bytes(ref[0:ps]), bytes(changed), bytes(ps), rng.randbytes(ps)]
    pfns = [0, 1, 2, 3]
    c = Codec(fallback, 4, ps)
    c.encode(bytes(ref), pfns)  # prime the cache with the reference
    enc = c.encode(b"".join(pages), pfns)
    assert kinds(enc, 4, ps) == [SAME, DELTA, ZERO, RAW]
    return enc, pfns, bytes(ref), b"".join(pages)


def _decode_guarded(impl: ModuleType, enc: bytes, pfns: list[int], ref: bytes, ps: int) -> bytes:
    """Decode into the middle of a larger buffer and check nothing outside changed."""
    n = len(pfns)
    guard = b"\xa5" * 64
    buf = bytearray(guard + b"\x5a" * (n * ps) + guard)
    try:
        with memoryview(buf) as mv:
            impl.delta_decode(enc, pfn_bytes(pfns), ref, mv[64 : 64 + n * ps], ps)
    finally:
        assert buf[:64] == guard and buf[64 + n * ps :] == guard, "wrote outside out"
    return bytes(buf[64 : 64 + n * ps])


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_decode_rejects_malformed(impl: ModuleType) -> None:
    ps = 64
    enc, pfns, ref, pages = _valid_stream(ps)
    assert _decode_guarded(impl, enc, pfns, ref, ps) == pages
    for cut in range(len(enc)):  # every truncation
        with pytest.raises(ValueError):
            _decode_guarded(impl, enc[:cut], pfns, ref, ps)
    one = [0]  # streams of a single page
    bad = [
        (enc + b"\0", pfns),  # trailing
        (bytes([4]) + enc[1:], pfns),  # unknown kind
        (bytes([255]) + enc[1:], pfns),
        (bytes([ZERO, ZERO]), one),  # trailing page
        (bytes([DELTA]) + struct.pack("<H", 0), one),  # no runs
        (bytes([DELTA]) + struct.pack("<HHH", 1, 0, 0), one),  # empty run
        (bytes([DELTA]) + struct.pack("<HHH", 1, 16, 1) + bytes(4), one),  # past the end
        (bytes([DELTA]) + struct.pack("<HHH", 1, 15, 2) + bytes(8), one),
        (bytes([DELTA]) + struct.pack("<HHH", 1, 0, 0xFFFF) + bytes(4 * 16), one),  # oversized
        (bytes([DELTA]) + struct.pack("<HHH", 1, 0xFFFF, 1) + bytes(4), one),
        (  # the second run runs off the page
            bytes([DELTA])
            + struct.pack("<HHH", 2, 0, 10)
            + bytes(40)
            + struct.pack("<HH", 0, 7)
            + bytes(28),
            one,
        ),
    ]
    for stream, stream_pfns in bad:
        with pytest.raises(ValueError):
            _decode_guarded(impl, stream, stream_pfns, ref, ps)
    # pfn outside the reference, out too small, bad page size, read-only out
    with pytest.raises(ValueError):
        _decode_guarded(impl, bytes([ZERO]), [4], ref, ps)
    with pytest.raises(ValueError):
        impl.delta_decode(enc, pfn_bytes(pfns), ref, bytearray(3 * ps), ps)
    with pytest.raises(ValueError):
        impl.delta_decode(enc, pfn_bytes(pfns), ref, bytearray(4 * ps), 62)
    with pytest.raises(TypeError):
        impl.delta_decode(enc, pfn_bytes(pfns), ref, bytes(4 * ps), ps)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_delta_decode_fuzz_impls_agree(data: st.DataObject) -> None:
    ps = 64
    enc, pfns, ref, _pages = _valid_stream(ps)
    stream = bytearray(enc)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "random"]))
        if op == "flip" and stream:
            i = data.draw(st.integers(0, len(stream) - 1))
            stream[i] = data.draw(st.integers(0, 255))
        elif op == "cut" and stream:
            i = data.draw(st.integers(0, len(stream) - 1))
            del stream[i : i + data.draw(st.integers(1, 8))]
        elif op == "insert":
            i = data.draw(st.integers(0, len(stream)))
            stream[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            stream = bytearray(data.draw(st.binary(max_size=300)))
    n = data.draw(st.integers(0, 4))
    outcomes: list[bytes | None] = []
    for impl in BOTH:
        try:
            outcomes.append(_decode_guarded(impl, bytes(stream), pfns[:n], ref, ps))
        except ValueError:
            outcomes.append(None)
    assert all(o == outcomes[0] for o in outcomes)


# -- KVM: kick and dirty log ------------------------------------------------------------

KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_MEM_LOG_DIRTY_PAGES = 1
EINTR = 4
needs_kvm = pytest.mark.skipif(
    native is None or not os.access("/dev/kvm", os.R_OK | os.W_OK),
    reason="needs /dev/kvm and tremus._native",
)


class TinyVM:
    """A VM with one vCPU whose reset vector is `jmp $` (a guest that spins), and a
    second, dirty-logged memory slot."""

    SPIN_GPA = 0xFFFFF000
    LOGGED_GPA = 0x100000
    LOGGED_PAGES = 128

    def __init__(self) -> None:
        assert native is not None
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.spin = mmap.mmap(-1, 4096)
        self.spin[:] = b"\xeb\xfe" * 2048  # jmp $, everywhere
        self.logged = mmap.mmap(-1, self.LOGGED_PAGES * 4096)
        self._region(0, 0, self.SPIN_GPA, self.spin)
        self._region(1, KVM_MEM_LOG_DIRTY_PAGES, self.LOGGED_GPA, self.logged)
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _region(self, slot: int, flags: int, gpa: int, mem: mmap.mmap) -> None:
        assert native is not None
        region = struct.pack("<IIQQQ", slot, flags, gpa, len(mem), native.buffer_address(mem))
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)

    def close(self) -> None:
        self.run.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)


@pytest.fixture
def tiny_vm():  # type: ignore[no-untyped-def]
    vm = TinyVM()
    yield vm
    vm.close()


@needs_kvm
def test_kvm_run_returns_eintr_with_immediate_exit(tiny_vm: TinyVM) -> None:
    assert native is not None
    tiny_vm.run[1] = 1
    assert native.kvm_run(tiny_vm.vcpu) == -EINTR
    tiny_vm.run[1] = 0


@needs_kvm
def test_kick_stops_a_running_vcpu(tiny_vm: TinyVM) -> None:
    assert native is not None
    signum = signal.SIGRTMIN + 3
    native.install_kick_handler(signum)
    started = threading.Event()
    results: list[int] = []

    def vcpu_thread() -> None:
        assert native is not None
        started.set()
        while True:  # the spinning guest only leaves KVM_RUN when kicked
            rc = native.kvm_run(tiny_vm.vcpu)
            results.append(rc)
            if rc != 0:
                return

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    thread.start()
    started.wait()
    time.sleep(0.05)  # let it enter KVM_RUN
    assert thread.ident is not None
    native.kick(thread.ident, tiny_vm.run, signum)
    thread.join(timeout=10)
    assert not thread.is_alive(), "vCPU thread did not leave KVM_RUN"
    assert results[-1] == -EINTR
    assert tiny_vm.run[1] == 1
    tiny_vm.run[1] = 0


@needs_kvm
def test_kick_and_buffer_address_errors(tiny_vm: TinyVM) -> None:
    assert native is not None
    with pytest.raises(ValueError):
        native.kick(threading.get_ident(), bytearray(1), signal.SIGRTMIN + 3)
    with pytest.raises(TypeError):
        native.kick(threading.get_ident(), bytes(4096), signal.SIGRTMIN + 3)
    with pytest.raises(ValueError):
        native.install_kick_handler(0)
    buf = bytearray(16)
    import ctypes

    assert native.buffer_address(buf) == ctypes.addressof((ctypes.c_char * 16).from_buffer(buf))


@needs_native
@pytest.mark.parametrize("spin_ns", [0, 50_000_000])
def test_a_parked_thread_leaves_only_when_released(spin_ns: int) -> None:
    """kvm_wait_run (vcpu_fd < 0: park only) says it parked once it let go of the
    GIL, spinning or sleeping leaves on the release flag alone: a write to the
    eventfd left over from an earlier release only wakes it to look again."""
    assert native is not None
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flags = bytearray(2)
    results: list[tuple[int, int]] = []
    thread = threading.Thread(
        target=lambda: results.append(native.kvm_wait_run(fd, -1, flags, spin_ns)), daemon=True)
    try:
        os.eventfd_write(fd, 1)  # stale: no release flag
        thread.start()
        assert native.spin_until_set(flags, 10_000_000_000)
        assert flags[0] == 1
        time.sleep(0.1)
        assert thread.is_alive() and not results
        released = time.perf_counter_ns()
        flags[1] = 1
        os.eventfd_write(fd, 1)
        thread.join(timeout=10)
        assert not thread.is_alive()
        rc, woke_ns = results[0]
        assert rc == 0 and woke_ns >= released
    finally:
        flags[1] = 1
        os.eventfd_write(fd, 1)
        thread.join(timeout=10)
        os.close(fd)


@needs_native
@pytest.mark.parametrize("same_cpu", [True, False], ids=["on-the-controllers-cpu", "elsewhere"])
def test_a_park_on_the_controllers_cpu_sleeps_instead_of_spinning(same_cpu: bool) -> None:
    """A parked thread told (flags[4:8]) that the controlling thread runs on its own
    CPU sleeps at once, even with a long spin allowed: a spin there would only hand
    that CPU back and forth. Told another CPU, it spins (burns CPU time) as asked."""
    assert native is not None
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flags = bytearray(8)
    cpu = sorted(os.sched_getaffinity(0))[0]
    struct.pack_into("=i", flags, 4, cpu if same_cpu else cpu + 10_000)
    cpu_used: list[float] = []
    results: list[tuple[int, int]] = []

    def park() -> None:
        os.sched_setaffinity(0, {cpu})
        before = time.thread_time()
        results.append(native.kvm_wait_run(fd, -1, flags, 5_000_000_000))
        cpu_used.append(time.thread_time() - before)

    thread = threading.Thread(target=park, daemon=True)
    try:
        thread.start()
        assert native.spin_until_set(flags, 10_000_000_000)
        time.sleep(0.3)
        assert thread.is_alive() and not results
        flags[1] = 1
        os.eventfd_write(fd, 1)
        thread.join(timeout=10)
        assert not thread.is_alive() and results[0][0] == 0
        if same_cpu:
            assert cpu_used[0] < 0.1, cpu_used
        else:
            assert cpu_used[0] > 0.1, cpu_used
    finally:
        flags[1] = 1
        os.eventfd_write(fd, 1)
        thread.join(timeout=10)
        os.close(fd)
    assert native.current_cpu() in os.sched_getaffinity(0)


@needs_native
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_park_on_the_controllers_cpu_moves_off_it_and_back() -> None:
    """With another CPU allowed, a thread that parks on the controlling thread's CPU
    moves off it for the pause (it spins elsewhere) and has its own affinity back
    once released; the registers it is asked to save arrive, or the error does."""
    assert native is not None
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flags = bytearray(8)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    struct.pack_into("=i", flags, 4, cpus[0])
    state = bytearray(4096)
    seen: dict[str, Any] = {}

    def park() -> None:
        os.sched_setaffinity(0, {cpus[0]})
        while native.current_cpu() != cpus[0]:
            time.sleep(0.001)
        os.sched_setaffinity(0, set(cpus))  # allowed on both, running on the first
        # An eventfd is no vCPU: the register read fails and says so in flags[3].
        seen["result"] = native.kvm_wait_run(fd, -1, flags, 5_000_000_000, fd, state)
        seen["affinity"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=park, daemon=True)
    try:
        thread.start()
        assert native.spin_until_set(flags, 10_000_000_000)
        assert native.spin_until_set(memoryview(flags)[2:3], 10_000_000_000)
        assert flags[3] == errno.ENOTTY
        tid = thread.native_id
        assert tid is not None
        deadline = time.monotonic() + 5
        while _cpu_of(tid) == cpus[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _cpu_of(tid) == cpus[1]
        assert os.sched_getaffinity(tid) == {cpus[1]}
        flags[1] = 1
        os.eventfd_write(fd, 1)
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert seen["result"][0] == 0 and seen["affinity"] == set(cpus)
    finally:
        flags[1] = 1
        os.eventfd_write(fd, 1)
        thread.join(timeout=10)
        os.close(fd)
    with pytest.raises(ValueError, match="state"):
        native.kvm_wait_run(fd, -1, bytearray(8), 0, 3, bytearray(16))


def _tiny_park(tiny_vm: TinyVM, wake: int) -> tuple[bytearray, tuple[Any, ...]]:
    """Flags (32 bytes, the controlling CPU unknown) and the park tuple of the
    in-C parks, reading the tiny VM's registers."""
    flags = bytearray(32)
    struct.pack_into("=i", flags, 4, -1)
    state = bytearray(4096)
    assert native is not None
    return flags, (wake, flags, 1_000_000, tiny_vm.vcpu, state, None, tiny_vm.run)


def _stamp(flags: bytearray, offset: int) -> int:
    return int(struct.unpack_from("=q", flags, offset)[0])


@needs_kvm
def test_kvm_run_parking_parks_in_c_at_a_kick_and_runs_the_guest_again(tiny_vm: TinyVM) -> None:
    """A kick with a pause asked for (flags[8]) parks the vCPU thread in C, stamped
    as it left KVM_RUN, its registers saved; released, it enters KVM_RUN again
    without returning (the guest spins on); a kick with no pause asked for, or a
    stop (flags[9]), returns -EINTR; the kick's immediate_exit is cleared each time."""
    assert native is not None
    signum = signal.SIGRTMIN + 3
    native.install_kick_handler(signum)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flags, park = _tiny_park(tiny_vm, wake)
    results: list[int] = []
    started = threading.Event()

    def vcpu_thread() -> None:
        assert native is not None
        started.set()
        results.append(native.kvm_run_parking(tiny_vm.vcpu, park))
        results.append(native.kvm_run_parking(tiny_vm.vcpu, park))

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    try:
        thread.start()
        started.wait()
        time.sleep(0.05)
        assert thread.ident is not None
        for _ in range(3):
            flags[0], flags[8] = 0, 1
            kicked = time.perf_counter_ns()
            native.kick(thread.ident, tiny_vm.run, signum)
            assert native.spin_until_set(flags, 10_000_000_000)
            stopped = _stamp(flags, 16)
            assert kicked <= stopped <= time.perf_counter_ns()
            assert native.spin_until_set(memoryview(flags)[2:3], 10_000_000_000)
            assert flags[3] == 0 and tiny_vm.run[1] == 0
            time.sleep(0.05)
            assert not results  # parked, not returned
            flags[8] = 0
            released = time.perf_counter_ns()
            flags[1] = 1
            os.eventfd_write(wake, 1)
            deadline = time.monotonic() + 10
            while _stamp(flags, 24) < released and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _stamp(flags, 24) >= released
            time.sleep(0.05)
            assert not results and thread.is_alive()  # back in KVM_RUN, the guest spinning
        flags[0] = 0
        native.kick(thread.ident, tiny_vm.run, signum)  # no pause asked for
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            time.sleep(0.001)
        assert results == [-EINTR] and flags[0] == 0 and tiny_vm.run[1] == 0
        time.sleep(0.05)
        flags[8] = 1
        native.kick(thread.ident, tiny_vm.run, signum)
        assert native.spin_until_set(flags, 10_000_000_000)
        flags[9] = 1  # a stop ends the park: no KVM_RUN
        native.kick(thread.ident, tiny_vm.run, signum)
        flags[1] = 1
        os.eventfd_write(wake, 1)
        thread.join(timeout=10)
        assert not thread.is_alive() and results == [-EINTR, -EINTR]
    finally:
        flags[9] = flags[1] = 1
        os.eventfd_write(wake, 1)
        if thread.is_alive() and thread.ident is not None:
            native.kick(thread.ident, tiny_vm.run, signum)
        thread.join(timeout=10)
        os.close(wake)
        tiny_vm.run[1] = 0


@needs_kvm
def test_poll_or_park_polls_or_parks_in_c(tiny_vm: TinyVM) -> None:
    """poll_or_park returns the readable fds as a mask (0 at the timeout), parks
    in C if a pause is asked for before or during the poll (-1 once released; no
    KVM_RUN: the registers are saved, the stamps set), and never parks on a stop."""
    assert native is not None
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    first, second = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    flags, park = _tiny_park(tiny_vm, wake)
    results: list[int] = []
    thread: threading.Thread | None = None
    try:
        assert native.poll_or_park((first, second), 10, park) == 0
        os.eventfd_write(second, 1)
        assert native.poll_or_park((first, second), 1000, park) == 2
        os.eventfd_write(first, 1)
        assert native.poll_or_park((first, second), 1000, park) == 3
        with pytest.raises(ValueError):
            native.poll_or_park((), 0, park)
        with pytest.raises(ValueError, match="kvm_run"):
            native.poll_or_park((first,), 0, park[:6] + (None,))
        with pytest.raises(ValueError, match="32"):
            native.poll_or_park((first,), 0, (wake, bytearray(8)) + park[2:])
        os.eventfd_read(first)
        os.eventfd_read(second)
        for asked_before in (True, False):
            flags[0] = flags[2] = 0
            flags[8] = 1 if asked_before else 0
            thread = threading.Thread(
                target=lambda: results.append(native.poll_or_park((first,), -1, park)),
                daemon=True)
            thread.start()
            if not asked_before:
                time.sleep(0.05)
                assert not results and flags[0] == 0  # polling
                flags[8] = 1
                os.eventfd_write(first, 1)  # as suspend pokes the HLT wait
            assert native.spin_until_set(flags, 10_000_000_000)
            assert native.spin_until_set(memoryview(flags)[2:3], 10_000_000_000)
            assert flags[3] == 0
            time.sleep(0.05)
            assert not results
            flags[8] = 0
            flags[1] = 1
            os.eventfd_write(wake, 1)
            thread.join(timeout=10)
            assert results.pop() == -1
            assert _stamp(flags, 24) >= _stamp(flags, 16) > 0
            if not asked_before:
                os.eventfd_read(first)
        flags[8] = flags[9] = 1
        flags[0] = 0
        assert native.poll_or_park((first,), 10, park) == 0 and flags[0] == 0
    finally:
        flags[1] = flags[9] = 1
        os.eventfd_write(wake, 1)
        if thread is not None:
            thread.join(timeout=10)
        for fd in (wake, first, second):
            os.close(fd)


def _cpu_of(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[36])


@needs_native
def test_spin_until_set_times_out_and_checks_its_buffer() -> None:
    assert native is not None
    flag = bytearray(1)
    started = time.perf_counter_ns()
    assert native.spin_until_set(flag, 2_000_000) is False
    assert time.perf_counter_ns() - started >= 2_000_000
    flag[0] = 1
    assert native.spin_until_set(flag, 0) is True
    with pytest.raises(ValueError):
        native.spin_until_set(bytearray(0), 0)
    with pytest.raises(TypeError):
        native.spin_until_set(b"\x01", 0)
    with pytest.raises(ValueError):
        native.kvm_wait_run(-1, -1, bytearray(1))


@needs_kvm
def test_dirty_log_is_clean_before_the_guest_runs(tiny_vm: TinyVM) -> None:
    assert native is not None
    tiny_vm.logged[:4096] = b"\x11" * 4096  # host writes are not in KVM's log
    bitmap = bytearray(b"\xff" * (TinyVM.LOGGED_PAGES // 8))
    assert native.get_dirty_log(tiny_vm.vm, 1, bitmap) is None
    assert bitmap == bytes(len(bitmap))
    assert native.dirty_bitmap_to_pfns(bitmap) == b""
    with pytest.raises(OSError):
        native.get_dirty_log(tiny_vm.vm, 7, bitmap)  # no such slot
    with pytest.raises(ValueError):
        native.get_dirty_log(tiny_vm.vm, 1, bytearray(5))


@needs_kvm
def test_dirty_log_merged_with_the_vmms_writes_in_one_call(tiny_vm: TinyVM) -> None:
    """With ``out``, get_dirty_log also merges the VMM's own bitmap (then zeroed) and
    counts the pages, as dirty_bitmap_merge does."""
    assert native is not None
    size = TinyVM.LOGGED_PAGES // 8
    bitmap, out = bytearray(b"\xff" * size), bytearray(b"\xaa" * size)
    extra = bytearray(size)
    extra[0], extra[size - 1] = 0b101, 0x80
    want = bytes(extra)
    assert native.get_dirty_log(tiny_vm.vm, 1, bitmap, extra, out) == 3
    assert bitmap == bytes(size) and out == want and extra == bytes(size)
    assert native.get_dirty_log(tiny_vm.vm, 1, bitmap, None, out) == 0
    assert out == bytes(size)
    with pytest.raises(ValueError, match="out has"):
        native.get_dirty_log(tiny_vm.vm, 1, bitmap, None, bytearray(size + 8))
    with pytest.raises(ValueError, match="extra has"):
        native.get_dirty_log(tiny_vm.vm, 1, bitmap, bytearray(8), out)
    with pytest.raises(ValueError, match="extra needs out"):
        native.get_dirty_log(tiny_vm.vm, 1, bitmap, extra)
    with pytest.raises(OSError):
        native.get_dirty_log(tiny_vm.vm, 7, bitmap, extra, out)  # no such slot


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1, 4096, 5 << 20])
def test_empty_bytearray(impl: ModuleType, size: int) -> None:
    buf = impl.empty_bytearray(size)
    assert isinstance(buf, bytearray) and len(buf) == size
    buf[:] = b"\x01" * size
    with pytest.raises(ValueError):
        impl.empty_bytearray(-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_scatter_split_over_threads_matches_reference(impl: ModuleType) -> None:
    """Scatters of 1 MiB and more run on two threads in the native helper."""
    rng = random.Random(7)
    pages = 1024
    pfns = rng.sample(range(4 * pages), pages)
    src = bytes(rng.getrandbits(8) for _ in range(pages * 4096 // 64)) * 64
    dst = bytearray(4 * pages * 4096)
    impl.scatter(dst, pfn_bytes(pfns), src)
    for i, pfn in enumerate(pfns):
        assert dst[pfn * 4096 : (pfn + 1) * 4096] == src[i * 4096 : (i + 1) * 4096]
    bad = pfns[:]
    bad[-1] = 4 * pages  # out of range, in the second thread's half
    before = bytes(dst)
    with pytest.raises(ValueError, match="outside"):
        impl.scatter(dst, pfn_bytes(bad), src)
    assert dst == before  # validated before anything was written
