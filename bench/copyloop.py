"""Copy-loop benchmark: gathering D dirty pages against memcpy of the same bytes.

The copy of dirty pages into the staging buffer happens while the guest is
paused, so its speed is part of every checkpoint's pause. The limit is memcpy
of the same number of bytes, measured in the same run on the same memory.

Setup: 1 GiB of guest RAM as the micro-VM allocates it (``guest_memory``:
anonymous, in transparent huge pages where the kernel gives them) filled with
non-zero data. For
each D, every repetition picks D fresh random distinct pages (ascending, as
``dirty_bitmap_to_pfns`` returns them) so that the source is as cold as it is
after an epoch, and the memcpy limit copies D*4 KiB from a fresh random offset
of the same region into the same destination. Gather and memcpy runs alternate,
so that both see the same machine conditions (bandwidth drifts on a shared host).

    python bench/copyloop.py [--quick]
"""

from __future__ import annotations

import mmap
import os
import random
import sys
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import arg_parser, emit, gbps, log, time_interleaved, time_median  # noqa: E402

from tremus import accel  # noqa: E402
from tremus._memory import guest_memory  # noqa: E402

REGION_BYTES = 1 << 30
PAGE = 4096
DIRTY_PAGES = (1, 64, 256, 1024, 4096, 16384)


def make_region() -> mmap.mmap:
    """1 GiB of guest RAM (``guest_memory``), every page written with non-zero data."""
    region = guest_memory(REGION_BYTES).mapping
    chunk = 1 << 20
    block = bytearray(os.urandom(chunk))
    with memoryview(region) as mv:
        for i, off in enumerate(range(0, REGION_BYTES, chunk)):
            block[:8] = i.to_bytes(8, "little")  # no two chunks alike
            mv[off : off + chunk] = block
    return region


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    native = accel.native
    if native is None:
        log(
            f"tremus._native is not built ({accel.native_import_error}); "
            "run `python setup.py build_ext --inplace`"
        )
        raise SystemExit(2)
    fallback = accel.fallback
    budget = 0.4 if args.quick else 3.0
    fallback_budget = 0.3 if args.quick else 2.0
    rng = random.Random(0x7E5)
    npages = REGION_BYTES // PAGE

    log("faulting in the 1 GiB region...")
    region = make_region()
    dst = mmap.mmap(-1, max(DIRTY_PAGES) * PAGE)
    native.memcpy(dst, memoryview(region)[: len(dst)])  # fault the destination in

    results = []
    for d in DIRTY_PAGES:
        nbytes = d * PAGE

        def random_pfns(d: int = d) -> bytes:
            return array("Q", sorted(rng.sample(range(npages), d))).tobytes()

        def random_span(nbytes: int = nbytes) -> memoryview:
            off = rng.randrange(0, (REGION_BYTES - nbytes) // PAGE + 1) * PAGE
            return memoryview(region)[off : off + nbytes]

        t_gather, t_memcpy = time_interleaved(
            [
                (lambda p: native.gather(region, p, dst), random_pfns),
                (lambda s: native.memcpy(dst, s), random_span),
            ],
            budget_s=budget,
        )
        t_fall = time_median(
            lambda p: fallback.gather(region, p, dst),
            random_pfns,
            min_reps=3,
            budget_s=fallback_budget,
        )
        row = {
            "dirty_pages": d,
            "bytes": nbytes,
            "gather_gbps": round(gbps(nbytes, t_gather.median_s), 3),
            "memcpy_gbps": round(gbps(nbytes, t_memcpy.median_s), 3),
            "fallback_gbps": round(gbps(nbytes, t_fall.median_s), 3),
            "ratio_to_memcpy": round(t_memcpy.median_s / t_gather.median_s, 3),
            "gather_us": round(t_gather.median_s * 1e6, 2),
            "memcpy_us": round(t_memcpy.median_s * 1e6, 2),
            "fallback_us": round(t_fall.median_s * 1e6, 2),
            "reps": {"paired": t_gather.reps, "fallback": t_fall.reps},
        }
        log(
            f"D={d}: gather {row['gather_gbps']} GB/s, memcpy {row['memcpy_gbps']} GB/s, "
            f"ratio {row['ratio_to_memcpy']}, fallback {row['fallback_gbps']} GB/s"
        )
        results.append(row)

    emit(
        "copyloop",
        results,
        params={
            "region_bytes": REGION_BYTES,
            "page_size": PAGE,
            "quick": args.quick,
            "source": "guest_memory (anonymous, THP where given), pre-faulted, fresh random pages each repetition",
        },
    )


if __name__ == "__main__":
    main()
