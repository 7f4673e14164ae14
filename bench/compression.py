"""Delta coding on the dirty workload: how many bytes it saves, and how fast it codes.

Part 1, ratio: a real micro-VM runs the ``dirty`` workload with each pattern
(``random``, ``sequential``, ``hotset``) over a working set that fits the delta
cache (4096 pages) and one twice its size (16384 pages; the cache has 8192 slots,
direct-mapped, as legacy Remus's), protected by the real ``PrimarySession`` in
blackhole mode with codec ``delta``. Per row: ``ratio`` = page bytes before coding
over bytes on the wire (``raw_bytes / bytes_sent`` of ``CheckpointAcked``, summed
over the measured epochs; the wire bytes include frame headers, pfn lists and the
vCPU/device state), and the wire bytes per dirty page.

The guest writes one 8-byte word per page write, so a page dirtied once in an epoch
differs from its last sent copy by 8 bytes: an easy case for a page delta. Remus
reports ~10:1 on a kernel build, whose pages change far more.

Part 2, speed: ``DeltaCodec.encode`` (native ``delta_encode``) on batches of 1024
pages in the three cases it meets — pages never sent (cache misses: sent raw),
pages with one word changed (DELTA), pages unchanged (SAME) — and ``delta_decode``
of the same, as GB/s of page data, against memcpy of the same bytes.

    python bench/compression.py [--quick]
"""

from __future__ import annotations

import os
import sys
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tremus.accel import impl  # noqa: E402
from tremus.domains.registry import create_domain  # noqa: E402
from tremus.engine.config import ProtectionConfig  # noqa: E402
from tremus.engine.events import CheckpointAcked, Event  # noqa: E402
from tremus.transports.codec import DeltaCodec  # noqa: E402

PAGE = 4096
RATE = 40_000
WARMUP = 2  # epochs dropped: the full first checkpoint fills the cache
PATTERNS = ("random", "sequential", "hotset")


async def ratio(pattern: str, ws_pages: int, epochs: int, interval_ms: float) -> dict[str, Any]:
    memory = (ws_pages * PAGE >> 20) + 4
    domain: Any = create_domain(
        f"microvm:workload=dirty,memory={memory}M,ws={ws_pages * 4}K,rate={RATE},"
        f"pattern={pattern}")
    cfg = ProtectionConfig(interval_ms=interval_ms, codec="delta")
    acked: list[CheckpointAcked] = []
    enough = trio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, CheckpointAcked):
            acked.append(event)
            if len(acked) >= WARMUP + epochs:
                enough.set()

    await _common.protect_until(domain, None, cfg, on_event, enough,
                                60 + (WARMUP + epochs) * interval_ms / 1000 * 3)
    rows = acked[WARMUP : WARMUP + epochs]
    raw = sum(e.raw_bytes for e in rows)
    sent = sum(e.bytes_sent for e in rows)
    pages = sum(e.dirty_pages for e in rows)
    return {
        "pattern": pattern,
        "working_set_pages": ws_pages,
        "cache_pages": cfg.delta_cache_pages,
        "epochs": len(rows),
        "interval_ms": interval_ms,
        "dirty_pages": round(pages / len(rows)),
        "raw_bytes": raw,
        "bytes_sent": sent,
        "ratio": round(raw / sent, 2),
        "bytes_per_dirty_page": round(sent / pages, 1) if pages else None,
        "full_checkpoint_ratio": round(acked[0].raw_bytes / acked[0].bytes_sent, 3),
    }


def codec_speed(budget_s: float) -> list[dict[str, Any]]:
    """Encode and decode GB/s of 1024-page batches, per case, against memcpy."""
    n = 1024
    pfns = array("Q", range(4096, 4096 + n)).tobytes()
    pages = bytearray(os.urandom(n * PAGE))
    out = bytearray(n * PAGE)
    stamp = 1

    def change_one_word(codec: DeltaCodec) -> None:
        nonlocal stamp  # one 8-byte word per page, as the dirty guest writes
        stamp += 1
        word, off = stamp.to_bytes(8, "little"), (stamp * 64) % PAGE
        for i in range(n):
            pages[i * PAGE + off : i * PAGE + off + 8] = word

    cases: dict[str, Any] = {
        "miss": lambda codec: codec.reset(),  # empty cache: every page goes raw
        "delta": change_one_word,
        "same": lambda codec: None,
    }
    results = []
    for case, prepare in cases.items():
        codec = DeltaCodec(8192, PAGE)
        codec.encode(pages, pfns)  # fill the cache
        encoded: list[bytes] = []

        def setup(codec: DeltaCodec = codec, prepare: Any = prepare) -> DeltaCodec:
            prepare(codec)
            return codec

        def encode(codec: DeltaCodec, encoded: list[bytes] = encoded) -> None:
            encoded[:] = [codec.encode(pages, pfns)]  # the engine keeps one per batch

        t_enc = _common.time_median(encode, setup, budget_s=budget_s)
        blob = encoded[-1]
        # A replica to decode against (its content only matters for correctness,
        # which the tests check, not for speed).
        reference = bytearray(8192 * PAGE)
        impl.scatter(reference, pfns, pages, PAGE)

        def decode(_: object, blob: bytes = blob, reference: bytearray = reference) -> None:
            impl.delta_decode(blob, pfns, reference, out, PAGE)

        t_dec, t_cpy = _common.time_interleaved(
            [(decode, None), (lambda _: impl.memcpy(out, pages), None)], budget_s=budget_s)
        row = {
            "case": case,
            "pages": n,
            "encoded_bytes": len(blob),
            "encode_gbps": round(_common.gbps(n * PAGE, t_enc.median_s), 3),
            "decode_gbps": round(_common.gbps(n * PAGE, t_dec.median_s), 3),
            "memcpy_gbps": round(_common.gbps(n * PAGE, t_cpy.median_s), 3),
            "encode_ratio_to_memcpy": round(t_cpy.median_s / t_enc.median_s, 3),
            "decode_ratio_to_memcpy": round(t_cpy.median_s / t_dec.median_s, 3),
        }
        _common.log(f"  {case}: encode {row['encode_gbps']} GB/s, decode {row['decode_gbps']}"
                    f" GB/s, memcpy {row['memcpy_gbps']} GB/s ({len(blob)} bytes coded)")
        results.append(row)
    return results


async def main(quick: bool, smoke: bool) -> None:
    epochs = 40 if not quick else 10
    sets = (4096, 16384)
    patterns = PATTERNS
    if smoke:
        epochs, sets, patterns = 3, (1024,), ("random",)
    results = []
    for ws in sets:
        for pattern in patterns:
            row = await ratio(pattern, ws, epochs, 100.0)
            _common.log(f"compression: {pattern} ws={ws}: {row['dirty_pages']} dirty pages/epoch,"
                        f" ratio {row['ratio']}:1, {row['bytes_per_dirty_page']} B/page")
            results.append(row)
    _common.log("compression: codec speed")
    speed = codec_speed(0.05 if smoke else 0.3 if quick else 1.0)
    _common.emit("compression", results, codec_speed=speed,
                 reference={"remus_ratio": 10, "remus_workload": "kernel build"},
                 params={"mode": "blackhole", "codec": "delta", "rate_asked": RATE,
                         "warmup_epochs_dropped": WARMUP, "quick": quick, "smoke": smoke})


if __name__ == "__main__":
    parser = _common.arg_parser(__doc__ or "")
    args = parser.parse_args()
    trio.run(main, args.quick, args.smoke)
