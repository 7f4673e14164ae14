"""Shared helpers of the benchmarks: machine description, timing, JSON output.

Every benchmark prints one JSON object on stdout,
``{"bench": NAME, "machine": {...}, "results": [...]}``, so that results can be
recorded and compared across machines. Progress and diagnostics go to stderr, never stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Timing",
    "arg_parser",
    "emit",
    "gbps",
    "log",
    "machine_info",
    "time_interleaved",
    "time_median",
]

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/NAME.py` from a checkout
    sys.path.insert(0, str(REPO))

T = TypeVar("T")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, kernel, Python, date, commit."""
    try:
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration, ValueError):
        mem_kib = 0
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
    }
    try:
        from tremus import accel

        info["tremus_native"] = accel.native is not None
    except ImportError:
        info["tremus_native"] = False
    return info


@dataclass(frozen=True, slots=True)
class Timing:
    """Timing of repeated runs: the median is the figure, min and reps show spread."""

    median_s: float
    min_s: float
    max_s: float
    reps: int


def time_median(
    fn: Callable[[T], object],
    setup: Callable[[], T] | None = None,
    *,
    min_reps: int = 5,
    max_reps: int = 10_000,
    budget_s: float = 1.0,
) -> Timing:
    """Time ``fn(setup())`` repeatedly; ``setup`` runs outside the timed region.

    Runs at least ``min_reps`` times and then until ``budget_s`` of wall time or
    ``max_reps`` runs. The garbage collector is off while timing so that a
    collection does not land inside one run.
    """
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(samples) < max_reps:
            arg = setup() if setup is not None else None
            t0 = time.perf_counter_ns()
            fn(arg)  # type: ignore[arg-type]
            samples.append((time.perf_counter_ns() - t0) / 1e9)
            if len(samples) >= min_reps and time.perf_counter() - start >= budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def time_interleaved(
    cases: list[tuple[Callable[[Any], object], Callable[[], Any] | None]],
    *,
    min_reps: int = 5,
    max_reps: int = 10_000,
    budget_s: float = 1.0,
) -> list[Timing]:
    """Time several ``(fn, setup)`` cases in alternation, one run of each per round.

    Use it when the figure is a ratio between cases (e.g. gather against memcpy):
    on a shared or virtualised machine bandwidth drifts over seconds, and
    alternating makes every case see the same conditions.
    """
    samples: list[list[float]] = [[] for _ in cases]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        rounds = 0
        while rounds < max_reps:
            for (fn, setup), out in zip(cases, samples, strict=True):
                arg = setup() if setup is not None else None
                t0 = time.perf_counter_ns()
                fn(arg)
                out.append((time.perf_counter_ns() - t0) / 1e9)
            rounds += 1
            if rounds >= min_reps and time.perf_counter() - start >= budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return [Timing(statistics.median(x), min(x), max(x), len(x)) for x in samples]


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (10**9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The common command line: ``--quick`` (under a minute), and a hidden ``--smoke``
    (one tiny row, for the tests)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="finish in under a minute")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return parser


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the JSON result)."""
    print(msg, file=sys.stderr, flush=True)


def emit(bench: str, results: list[dict[str, Any]], **extra: Any) -> None:
    """Print the one JSON object of a benchmark run on stdout."""
    doc: dict[str, Any] = {"bench": bench, "machine": machine_info(), **extra, "results": results}
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


async def protect_until(domain: Any, stream: Any, config: Any, on_event: Callable[[Any], None],
                        enough: Any, timeout: float) -> None:
    """Run ``domain`` protected by a real ``PrimarySession`` until ``enough`` is set
    (an ``trio.Event`` that ``on_event`` sets), then stop both."""
    import trio

    from tremus.engine.primary import PrimarySession

    async with trio.open_nursery() as nursery:
        await nursery.start(domain.run)
        session = PrimarySession(domain, stream, config=config)
        session.events.add_callback(on_event)
        await nursery.start(session.run)
        with trio.fail_after(timeout):
            await enough.wait()
        session.stop()
        await session.stopped.wait()
        domain.stop()
