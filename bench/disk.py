"""The replicated disk: guest write throughput, durability per epoch, commit delay.

Everything is measured in one run, on real ``tremus`` processes (``tremus run``,
``tremus backup`` and ``tremus protect`` on loopback, started with
``tremus.testing.procs.start_tremus``), against limits measured on the same disk:

* ``limit`` (top-level) — what this machine's disk can do, in the temporary
  directory where the backup keeps its replica and write log: ``fdatasync`` after
  appending 4 KiB or 64 KiB to a fresh file (the write and the ``fdatasync`` timed
  together; median and p99 µs), and raw sequential write throughput (1 MiB
  ``write`` calls, then one ``fdatasync``; MB/s to the page cache and to stable
  storage).
* one row per guest run: the ``diskwrite`` guest (``rate=0``: back to back,
  ``pattern=sequential``, 16 MiB image) at ``io_size`` 4 KiB and 64 KiB,
  ``unprotected`` (``tremus run``), ``replicated`` (``tremus protect --disk IMG``
  at ``interval_ms`` 25 and 100) and ``not_replicated`` (the same, with
  ``--no-disk-replication --unsafe``: the same guest and checkpoints, no disk in
  the commit).

Row figures: ``writes_per_s`` and ``mb_per_s`` — the guest's own progress (its
``diskwrite N`` console lines, every 64 writes) over the measured window, after a
warm-up; ``ratio_to_unprotected``; ``ratio_to_disk`` (over the sequential
page-cache throughput of the limit). The guest runs in KVM's instruction emulator
(~1 M guest instructions/s here), so an unprotected guest writes far below what the
disk takes: its speed is the bound. Whether a row is still bound by the guest is
measured, not assumed: ``vcpu_thread_cpu`` and ``vmm_main_thread_cpu`` are the
cores used by the guest's vCPU thread and by the VMM's main (Trio) thread over the
window (``run_cpu`` / ``primary_cpu`` / ``backup_cpu``: whole processes), and
``guest_bound`` is true when the vCPU thread had at least 0.85 of a core.

Protected rows, from the backup's ``disk_epoch_durable`` events: ``durable_us``
median / p99 (the backup's ``fdatasync`` of its write log for the epoch, through a
worker thread), ``epoch_writes`` and ``epoch_bytes`` (medians),
``ratio_to_fdatasync`` (median durability over the limit's median 4 KiB or 64 KiB
``fdatasync``, by the row's ``io_size``), ``same_bytes_fdatasync_us`` (measured after
the runs: ``fdatasync`` alone after appending an epoch's median bytes in ``io_size``
records, as the backup's log does) and ``ratio_to_same_bytes``. From the primary's
``checkpoint_acked`` events: ``round_trip_ms`` median / p99 (checkpoint sent to ACK:
with a replicated disk the backup applies — and acknowledges — memory checkpoint N
only once disk epoch N is durable), ``pause_us`` and ``dirty_pages``;
``commit_delay_ms`` is a replicated row's median round trip minus the
``not_replicated`` one at the same interval (``round_trip_ms_without_disk``). Where
the round trip goes (one host, one clock): ``disk_stream_lag_ms`` — from memory
checkpoint N sent to the backup starting to make disk epoch N durable (every write
of the epoch and its EPOCH mark received and logged) — then ``durable_us``, then
``ack_after_durable_ms`` until the primary has the ACK.

Needs ``/dev/kvm``. Other work on the machine changes the figures (two cores here).

    python bench/disk.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tremus.testing.procs import TremusProcess, start_tremus  # noqa: E402

IO_SIZES = (4096, 65536)
INTERVALS = (25, 100)
DISK_SIZE = "16M"
MEMORY = "8M"
PROGRESS = "diskwrite "
#: A vCPU thread using this much of a core runs the guest flat out (guest-bound).
GUEST_BOUND_CPU = 0.85


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of ``values``, or None."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _kib(nbytes: int) -> str:
    return f"{nbytes >> 10}K"


# -- the limit ------------------------------------------------------------------------


def fdatasync_cost(directory: str, size: int, reps: int) -> dict[str, Any]:
    """Append ``size`` bytes to a fresh file and ``fdatasync`` it, ``reps`` times."""
    path = os.path.join(directory, f"fdatasync-{size}.bin")
    data = os.urandom(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    samples = []
    try:
        pos = 0
        for i in range(reps + 5):
            t0 = time.perf_counter_ns()
            os.pwrite(fd, data, pos)
            os.fdatasync(fd)
            if i >= 5:  # warm-up: the file's first blocks
                samples.append((time.perf_counter_ns() - t0) / 1e3)
            pos += size
    finally:
        os.close(fd)
        os.unlink(path)
    return {"io_size": size, "reps": len(samples),
            "median_us": _r(statistics.median(samples)), "p99_us": _r(_pct(samples, 0.99)),
            "min_us": _r(min(samples))}


def same_bytes_fdatasync(directory: str, total: int, io_size: int, reps: int) -> float:
    """Median µs of ``fdatasync`` alone after appending ``total`` bytes in ``io_size``
    records (plus the backup log's 20-byte header each), as the backup's log does."""
    path = os.path.join(directory, "epoch.log")
    record = os.urandom(20 + io_size)
    count = max(1, round(total / io_size))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    samples = []
    try:
        pos = 0
        for i in range(reps + 2):
            for _ in range(count):
                os.pwrite(fd, record, pos)
                pos += len(record)
            t0 = time.perf_counter_ns()
            os.fdatasync(fd)
            if i >= 2:
                samples.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(samples)


def sequential_write(directory: str, total: int, reps: int) -> dict[str, Any]:
    """MB/s of 1 MiB writes into a new file (page cache), and with the final
    ``fdatasync`` (stable storage); medians over ``reps`` files."""
    block = os.urandom(1 << 20)
    cached, durable = [], []
    for _ in range(reps):
        path = os.path.join(directory, "sequential.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            t0 = time.perf_counter()
            for _ in range(total >> 20):
                os.write(fd, block)
            t1 = time.perf_counter()
            os.fdatasync(fd)
            t2 = time.perf_counter()
        finally:
            os.close(fd)
            os.unlink(path)
        cached.append(total / (t1 - t0) / 1e6)
        durable.append(total / (t2 - t0) / 1e6)
    return {"bytes": total, "reps": reps,
            "page_cache_mb_per_s": _r(statistics.median(cached)),
            "durable_mb_per_s": _r(statistics.median(durable))}


# -- the guest runs -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _progress(proc: TremusProcess) -> list[tuple[float, int]]:
    out = []
    for event in proc.of("console"):
        line = event["line"]
        if line.startswith(PROGRESS) and line[len(PROGRESS):].isdigit():
            out.append((event["time"], int(line[len(PROGRESS):])))
    return out


def _throughput(points: list[tuple[float, int]], start: float, end: float
                ) -> tuple[float, int]:
    """Writes per second between the first and the last progress line in the window."""
    inside = [p for p in points if start <= p[0] <= end]
    if len(inside) < 2:
        raise RuntimeError(f"only {len(inside)} progress lines in the measured window")
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0), n1 - n0


async def _stop(proc: TremusProcess, timeout: float = 10) -> None:
    """SIGTERM (a graceful stop: END to the backup), then SIGKILL if it lingers."""
    if proc.process.returncode is None:
        try:
            proc.process.terminate()
        except ProcessLookupError:
            pass
        with trio.move_on_after(timeout):
            await proc.exited.wait()
    proc.kill()
    await proc.exited.wait()


def _threads_cpu(proc: TremusProcess) -> dict[int, float]:
    """CPU seconds (user + system) each of the child's threads has used so far."""
    out = {}
    pid = proc.process.pid
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _cpu_figures(proc: TremusProcess, before: dict[int, float], after: dict[int, float],
                 seconds: float, row: dict[str, Any]) -> None:
    """Cores used over the window: the whole child, and for the one running the guest
    its main (Trio) thread and its busiest other thread (the vCPU's)."""
    used = {tid: (after[tid] - before.get(tid, 0.0)) / seconds for tid in after}
    row[f"{proc.name}_cpu"] = round(sum(used.values()), 2)
    if proc.name in ("run", "primary"):
        pid = proc.process.pid
        row["vmm_main_thread_cpu"] = round(used.get(pid, 0.0), 2)
        others = [v for tid, v in used.items() if tid != pid]
        row["vcpu_thread_cpu"] = round(max(others), 2) if others else None


def _spec(io_size: int) -> str:
    return (f"microvm:workload=diskwrite,memory={MEMORY},rate=0,pattern=sequential,"
            f"io_size={_kib(io_size)},disk_size={DISK_SIZE}")


async def guest_run(tmp: str, mode: str, io_size: int, interval_ms: int | None,
                    warmup_s: float, window_s: float) -> dict[str, Any]:
    """One guest run; returns its row (the figures read from the children's events)."""
    run_tmp = tempfile.mkdtemp(prefix=f"{mode}-", dir=tmp)
    image = os.path.join(run_tmp, "disk.img")
    row: dict[str, Any] = {"mode": mode, "io_size": io_size, "interval_ms": interval_ms}
    try:
        async with trio.open_nursery() as nursery:
            procs: list[TremusProcess] = []
            try:
                if mode == "unprotected":
                    vm = await start_tremus(nursery, "run", "run", "--domain",
                                            f"{_spec(io_size)},disk={image}", "--json")
                    procs.append(vm)
                    started = await vm.wait_for(lambda p: p.of("domain_started"), 30,
                                                "domain_started")
                    backup = None
                else:
                    port = _free_port()
                    backup = await start_tremus(
                        nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                        "--state-dir", os.path.join(run_tmp, "state"), "--json")
                    procs.append(backup)
                    await backup.wait_for(lambda p: p.of("backup_ready"), 30, "backup_ready")
                    extra = ["--no-disk-replication", "--unsafe"] \
                        if mode == "not_replicated" else []
                    vm = await start_tremus(
                        nursery, "primary", "protect", "--domain", _spec(io_size),
                        "--disk", image, "--backup", f"127.0.0.1:{port}",
                        "--run-dir", os.path.join(run_tmp, "run"),
                        "--interval", str(interval_ms), *extra, "--json")
                    procs.append(vm)
                    started = await vm.wait_for(lambda p: p.of("protection_started"), 60,
                                                "protection_started")
                t_start = started[0]["time"] + warmup_s
                t_end = t_start + window_s
                await trio.sleep(max(0.0, t_start - time.time()))
                cpu0 = [_threads_cpu(p) for p in procs]
                await trio.sleep(max(0.0, t_end - time.time()))
                cpu1 = [_threads_cpu(p) for p in procs]
                await trio.sleep(0.3)  # the last events of the window
                for proc, before, after in zip(procs, cpu0, cpu1, strict=True):
                    _cpu_figures(proc, before, after, window_s, row)
                for proc in procs:
                    lost = proc.of("backup_lost") + proc.of("device_failed") \
                        + proc.of("failover_started")
                    if lost:
                        raise RuntimeError(f"{mode} io={io_size} @{interval_ms}: {lost[0]}")
                for proc in reversed(procs):  # the primary first: END, no failover
                    await _stop(proc)
            finally:
                for proc in procs:
                    proc.kill()
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(run_tmp, ignore_errors=True)

    wps, writes = _throughput(_progress(vm), t_start, t_end)
    # The guest is emulated: unprotected, its vCPU thread runs flat out and its speed
    # is the bound. Protected, it is guest-bound only while its vCPU still gets a core.
    vcpu = row.get("vcpu_thread_cpu")
    row.update({"writes_per_s": round(wps, 1), "mb_per_s": round(wps * io_size / 1e6, 2),
                "writes_measured": writes, "window_s": window_s,
                "guest_bound": vcpu is not None and vcpu >= GUEST_BOUND_CPU})
    if mode == "unprotected":
        return row
    acked = [e for e in vm.of("checkpoint_acked")[1:] if t_start <= e["time"] <= t_end]
    rtt = [e["round_trip_ms"] for e in acked]
    row.update({
        "epochs": len(acked),
        "round_trip_ms": _r(statistics.median(rtt), 2),
        "round_trip_ms_p99": _r(_pct(rtt, 0.99), 2),
        "pause_us": _r(statistics.median(e["pause_us"] for e in acked)),
        "dirty_pages": int(statistics.median(e["dirty_pages"] for e in acked)),
    })
    if mode == "replicated":
        assert backup is not None
        durable = [e for e in backup.of("disk_epoch_durable") if t_start <= e["time"] <= t_end]
        if not durable:
            raise RuntimeError("no disk_epoch_durable event in the measured window")
        us = [e["durable_us"] for e in durable]
        row.update({
            "durable_epochs": len(durable),
            "durable_us": _r(statistics.median(us)),
            "durable_us_p99": _r(_pct(us, 0.99)),
            "epoch_writes": int(statistics.median(e["writes"] for e in durable)),
            "epoch_bytes": int(statistics.median(e["bytes"] for e in durable)),
        })
        # Where the round trip goes: memory checkpoint N sent (primary) -> the backup
        # starts making disk epoch N durable (all its writes and EPOCH N received and
        # logged) -> durable -> ACK N back on the primary. One host, one clock.
        sent = {e["epoch"]: e["time"] for e in vm.of("checkpoint_sent")}
        acks = {e["epoch"]: e["time"] for e in vm.of("checkpoint_acked")}
        lag = [(e["time"] - e["durable_us"] / 1e6 - sent[e["epoch"]]) * 1e3
               for e in durable if e["epoch"] in sent]
        after = [(acks[e["epoch"]] - e["time"]) * 1e3 for e in durable if e["epoch"] in acks]
        row["disk_stream_lag_ms"] = _r(statistics.median(lag), 2) if lag else None
        row["ack_after_durable_ms"] = _r(statistics.median(after), 2) if after else None
    return row


# -- the run --------------------------------------------------------------------------


def plan(quick: bool, smoke: bool) -> list[tuple[str, int, int | None]]:
    if smoke:
        return [("unprotected", 4096, None), ("replicated", 4096, 100),
                ("not_replicated", 4096, 100)]
    runs: list[tuple[str, int, int | None]] = [("unprotected", s, None) for s in IO_SIZES]
    for interval in INTERVALS:
        for size in IO_SIZES:
            if quick and size != 4096 and interval != 100:
                continue
            runs.append(("replicated", size, interval))
            if not quick or size == 4096:
                runs.append(("not_replicated", size, interval))
    return runs


async def run(tmp: str, quick: bool, smoke: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    reps = 30 if smoke else 200 if quick else 1000
    _common.log(f"disk: the limit in {tmp}")
    fsync = {size: fdatasync_cost(tmp, size, reps) for size in IO_SIZES}
    for f in fsync.values():
        _common.log(f"  write {_kib(f['io_size'])} + fdatasync: median {f['median_us']} us, "
                    f"p99 {f['p99_us']} us")
    seq = sequential_write(tmp, (16 if smoke else 128 if quick else 512) << 20,
                           1 if smoke else 3)
    _common.log(f"  sequential: {seq['page_cache_mb_per_s']} MB/s to the page cache, "
                f"{seq['durable_mb_per_s']} MB/s with fdatasync")
    limit = {"fdatasync": list(fsync.values()), "sequential_write": seq}

    warmup_s, window_s = (0.3, 0.7) if smoke else (1.0, 3.0) if quick else (2.0, 10.0)
    rows = []
    for mode, size, interval in plan(quick, smoke):
        row = await guest_run(tmp, mode, size, interval, warmup_s, window_s)
        _common.log(f"  {mode:>14} io={_kib(size):>3} @{interval} ms: {row['writes_per_s']} "
                    f"writes/s, {row['mb_per_s']} MB/s"
                    + (f", round trip {row['round_trip_ms']} ms" if "round_trip_ms" in row
                       else "")
                    + (f", durable {row['durable_us']} us (p99 {row['durable_us_p99']}) for "
                       f"{row['epoch_writes']} writes" if "durable_us" in row else ""))
        rows.append(row)

    base = {r["io_size"]: r["writes_per_s"] for r in rows if r["mode"] == "unprotected"}
    page_cache = seq["page_cache_mb_per_s"]
    for row in rows:
        row["ratio_to_unprotected"] = round(row["writes_per_s"] / base[row["io_size"]], 2) \
            if row["io_size"] in base else None
        row["ratio_to_disk"] = round(row["mb_per_s"] / page_cache, 4)
        if row["mode"] != "replicated":
            continue
        fs = fsync[row["io_size"]]
        row["fdatasync_us"] = fs["median_us"]
        row["ratio_to_fdatasync"] = round(row["durable_us"] / fs["median_us"], 2)
        same = same_bytes_fdatasync(tmp, row["epoch_bytes"], row["io_size"],
                                    10 if smoke else 30 if quick else 100)
        row["same_bytes_fdatasync_us"] = round(same, 1)
        row["ratio_to_same_bytes"] = round(row["durable_us"] / same, 2)
        plain = [r for r in rows if r["mode"] == "not_replicated"
                 and r["interval_ms"] == row["interval_ms"]]
        match = [r for r in plain if r["io_size"] == row["io_size"]] or plain
        if match:
            row["round_trip_ms_without_disk"] = match[0]["round_trip_ms"]
            row["without_disk_io_size"] = match[0]["io_size"]
            row["commit_delay_ms"] = round(row["round_trip_ms"] - match[0]["round_trip_ms"], 2)
    return limit, rows


def main() -> int:
    parser = _common.arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _common.log("disk: needs /dev/kvm")
        return 1
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tremus-bench-disk-")
    try:
        limit, rows = trio.run(run, tmp, args.quick, args.smoke)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _common.log(f"done in {time.perf_counter() - started:.1f} s")
    _common.emit("disk", rows, limit=limit,
                 params={"workload": "diskwrite", "rate": 0, "pattern": "sequential",
                         "disk_size": DISK_SIZE, "memory": MEMORY, "tmp_fs": _fs_of(tmp),
                         "quick": args.quick, "smoke": args.smoke})
    return 0


def _fs_of(path: str) -> str | None:
    """The filesystem and device the temporary directory lives on."""
    try:
        best = ("", "")
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype, *_ = line.split()
            if (path + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best[0]):
                best = (mount, f"{fstype} on {device} ({mount})")
        return best[1] or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
