"""Checkpoint stream throughput over loopback TCP, against a plain socket stream.

The checkpoint stream is the real engine on both ends: ``PrimarySession`` (encode,
checksums, framing, coalesced sends, ACK handling) over ``tcp://127.0.0.1`` to a
``BackupSession`` (receive, frame parsing, checksum verification, staging, scatter
into the replica, ACK), in one Trio run. The protected domain is a synthetic one
(``SyntheticDomain`` below: RAM-sized buffer of random data, each checkpoint
"dirties" a fresh random set of N pages), so that the figure is the stream's and
not the guest's: an emulated micro-VM here dirties at most a few tens of thousands
of pages a second. The page gather belongs to the pause (``bench/pause.py``,
``bench/copyloop.py``); timing starts when the domain is resumed, i.e. when the
engine starts encoding and sending, and ends when ``CheckpointAcked`` fires.

The limit, measured in the same run and alternated with the engine one checkpoint
at a time: a Trio TCP stream (same ``transports.connect/listen`` tuning) pushing as
many bytes as the engine sent for that checkpoint (``bytes_sent``: its frames), in
one ``send_all``, to a receiver that receives into one reused buffer (``recv_into``
of up to 4 MiB, as the backup receives page data) and discards, then answers with a
32-byte "ACK". The engine's own stream is not wrapped: it sends as it does over TCP
(one ``sendmsg`` a frame). Its frame checksums are computed as the pages are copied,
i.e. in the gather, which is the pause's.

Rows: raw codec for N = 1024, 4096, 16384 and 32768 pages, all of the 128 MiB RAM
(target ratio_to_socket >= 0.7); the first, full checkpoint (all RAM, received
straight into the backup's empty replica); and a delta row (a fixed, contiguous set of
4096 pages, one u64 changed per page per checkpoint, as the ``dirty`` guest does),
where ``effective_gbps`` counts page bytes before coding. Each in two topologies:
``one_process`` (backup and sink in this Trio run, so both ends share one thread)
and ``two_processes`` (backup and sink in a child process: each end has a core, as
on two hosts: unless ``--no-pin``, each process is pinned to a CPU of its own, the
primary's to one and the backup's and sink's to another, as two hosts would give
them; left to the scheduler, the threads of both ends moved across this machine's
CPUs and each move started them on cold caches). ``stages`` breaks one raw checkpoint down without sockets (framing,
parsing, staging, scatter), to show where the time goes; ``--profile`` adds a
cProfile of the one-process raw checkpoints on stderr.

    python bench/throughput.py [--quick] [--profile] [--no-pin]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import mmap
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from array import array
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tremus import transports  # noqa: E402
from tremus._memory import prefaulted_buffer  # noqa: E402
from tremus.domains.base import Geometry  # noqa: E402
from tremus.engine.backup import BackupSession  # noqa: E402
from tremus.engine.config import ProtectionConfig  # noqa: E402
from tremus.engine.events import CheckpointAcked, Event  # noqa: E402
from tremus.engine.primary import PrimarySession  # noqa: E402

PAGE = 4096
ACK_BYTES = 32
RECEIVE_SIZE = 4 << 20  # the most the backup receives into a payload at once


def random_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory filled with incompressible data, every page faulted in."""
    buf = mmap.mmap(-1, nbytes)
    chunk = 1 << 20
    block = bytearray(os.urandom(chunk))
    with memoryview(buf) as mv:
        for i, off in enumerate(range(0, nbytes, chunk)):
            block[:8] = i.to_bytes(8, "little")
            n = min(chunk, nbytes - off)
            mv[off : off + n] = block[:n]
    return buf


class SyntheticDomain:
    """A ``Domain`` with no vCPU: RAM of random data; each ``suspend`` waits for a
    permit from the benchmark saying how many pages the next checkpoint dirties.

    ``driver``/``config`` name a micro-VM of the same RAM size, so the backup's
    registry accepts the HELLO (the benchmark always ends with END: no failover).
    """

    driver = "microvm"

    def __init__(self, ram_bytes: int, seed: int = 1) -> None:
        self._geometry = Geometry(ram_bytes, PAGE)
        self._buf = random_buffer(ram_bytes)
        self._ram = memoryview(self._buf)
        self._rng = random.Random(seed)
        self._permits_send, self._permits = trio.open_memory_channel[tuple[int, bool]](1)
        self._pfns = memoryview(b"").cast("Q")
        self._fixed: dict[int, bytes] = {}
        self._stamp = 0
        self.suspended = False
        self.resumed_at: dict[int, float] = {}
        self.epoch = -1  # the epoch being captured / last captured
        self._stop = trio.Event()
        self._finished = False
        self._waiting: trio.CancelScope | None = None

    # -- what the benchmark drives
    def permit(self, pages: int, fixed: bool) -> None:
        """Let one checkpoint of ``pages`` pages happen (fixed: the same set each time,
        with one u64 changed per page; else a fresh random set). Without a checkpoint:
        the benchmark's own task is then waiting for the ACK before the engine's
        suspend runs, not scheduled in the middle of the checkpoint it times."""
        self._permits_send.send_nowait((pages, fixed))

    def _choose(self, pages: int, fixed: bool) -> bytes:
        total = self._geometry.pages
        if not fixed:
            return array("Q", sorted(self._rng.sample(range(total), pages))).tobytes()
        if pages not in self._fixed:
            # A contiguous working set, as the dirty guest's (above 2 MiB): it maps to
            # distinct slots of the delta cache up to its 8192 pages.
            first = min(512, total - pages)
            self._fixed[pages] = array("Q", range(first, first + pages)).tobytes()
        pfns = self._fixed[pages]
        ram = self._ram
        self._stamp += 1
        stamp = self._stamp.to_bytes(8, "little")
        off = (self._stamp * 64) % PAGE
        for pfn in memoryview(pfns).cast("Q"):
            base = pfn * PAGE + off
            ram[base : base + 8] = stamp
        return pfns

    def finish(self) -> None:
        """No more permits: every later checkpoint is empty."""
        self._finished = True
        if self._waiting is not None:
            self._waiting.cancel()

    # -- the Domain protocol
    @property
    def config(self) -> dict[str, Any]:
        return {"workload": "counter", "memory": self._geometry.ram_size}

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def ram(self) -> memoryview:
        return self._ram

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._stop.wait()

    async def suspend(self) -> None:
        if self.epoch >= 0:  # epoch 0 (full) needs no permit
            # The engine shields the pause: once the benchmark is done (``finish``),
            # suspends return at once with nothing dirty so the engine sees its stop.
            pages, fixed = 0, False
            with trio.CancelScope() as self._waiting:
                if not self._finished:
                    pages, fixed = await self._permits.receive()
            self._pfns = memoryview(self._choose(pages, fixed) if pages else b"").cast("Q")
        self.epoch += 1
        self.suspended = True

    async def resume(self) -> None:
        self.suspended = False
        self.resumed_at[self.epoch] = time.perf_counter()
        await trio.lowlevel.checkpoint()

    def stop(self) -> None:
        self._stop.set()

    def read_and_clear_dirty(self) -> memoryview:
        return self._pfns

    def save_state(self) -> bytes:
        return bytes(4096)  # about a micro-VM's vCPU + device state


async def _sink(stream: trio.abc.Stream) -> None:
    """The socket limit's receiver: per transfer, an 8-byte length, then that many
    bytes received into one reused buffer (``recv_into``, as the backup receives page
    data, at most ``RECEIVE_SIZE`` at a time) and discarded, then ACK."""
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    room = prefaulted_buffer(RECEIVE_SIZE)

    async def receive() -> memoryview:
        if sock is not None:
            return memoryview(room)[: await sock.recv_into(room)]
        return memoryview(await stream.receive_some(RECEIVE_SIZE))

    async with stream:
        length = bytearray()
        while True:
            while len(length) < 8:
                data = await receive()
                if not data:
                    return
                length += data
            left = int.from_bytes(length[:8], "little") - (len(length) - 8)
            length.clear()
            while left > 0:
                data = await receive()
                if not data:
                    return
                left -= len(data)
            assert left == 0, "the sender sent past its transfer"
            await stream.send_all(b"A" * ACK_BYTES)


async def serve(task_status: trio.TaskStatus[tuple[str, str]] = trio.TASK_STATUS_IGNORED,
                ) -> None:
    """The receiving side: a BackupSession per connection on one port, the socket
    limit's sink on another; reports (backup URL, sink URL)."""
    backup_listener = await transports.listen("tcp://127.0.0.1:0")
    sink_listener = await transports.listen("tcp://127.0.0.1:0")
    cfg = ProtectionConfig(heartbeat_timeout_ms=60_000)

    async def backup(stream: trio.abc.Stream) -> None:
        await BackupSession(stream, config=cfg).run()

    async def accept_loop(listener: transports.Listener, handler: Any) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(handler, await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, backup_listener, backup)
        nursery.start_soon(accept_loop, sink_listener, _sink)
        task_status.started((backup_listener.url, sink_listener.url))


def serve_main(cpu: int | None) -> None:
    """``--serve``: the receiving side in its own process (on ``cpu``, if given);
    URLs on stdout as JSON."""
    import json

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve)
            print(json.dumps(urls), flush=True)
            # Ends when the parent closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(run)


class SocketLimit:
    """The limit: a plain Trio TCP stream to ``_sink``, which reads and discards."""

    def __init__(self, source: mmap.mmap) -> None:
        self._source = source

    async def connect(self, url: str) -> None:
        self.stream = await transports.connect(url)

    async def transfer(self, nbytes: int) -> float:
        """Seconds to push ``nbytes`` bytes (one ``send_all`` per source's length)
        and get the ACK back."""
        await self.stream.send_all(nbytes.to_bytes(8, "little"))
        src = memoryview(self._source)
        t0 = time.perf_counter()
        left = nbytes
        while left:
            size = min(left, len(src))
            await self.stream.send_all(src[:size])
            left -= size
        got = 0
        while got < ACK_BYTES:
            data = await self.stream.receive_some(ACK_BYTES - got)
            if not data:
                raise RuntimeError("the socket receiver went away")
            got += len(data)
        return time.perf_counter() - t0

    async def aclose(self) -> None:
        await self.stream.aclose()


async def run_codec(codec: str, ram_bytes: int, cases: list[tuple[int, bool]], reps: int,
                    backup_url: str, limit: SocketLimit, profile: cProfile.Profile | None
                    ) -> list[dict[str, Any]]:
    """One protection session with ``codec``; per case, ``reps`` checkpoints
    alternated with socket transfers of the same sizes."""
    domain = SyntheticDomain(ram_bytes)
    acked: dict[int, tuple[float, CheckpointAcked]] = {}
    ack_event = trio.Event()

    def on_event(event: Event) -> None:
        nonlocal ack_event
        if isinstance(event, CheckpointAcked):
            acked[event.epoch] = (time.perf_counter(), event)
            ack_event.set()
            ack_event = trio.Event()

    async def wait_ack(epoch: int) -> tuple[float, CheckpointAcked]:
        with trio.fail_after(120):
            while epoch not in acked:
                await ack_event.wait()
        return acked[epoch]

    cfg = ProtectionConfig(interval_ms=1, codec=codec, max_inflight=1,
                           heartbeat_timeout_ms=30_000)
    rows: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(domain.run)
        stream = await transports.connect(backup_url)
        session = PrimarySession(domain, stream, config=cfg)
        session.events.add_callback(on_event)
        await nursery.start(session.run)

        t_full, ev = await wait_ack(0)
        full_s = t_full - domain.resumed_at[0]
        full_socket = await limit.transfer(ev.bytes_sent)
        rows.append(_row(codec, "full", ev, [full_s], [full_socket], 1, [ev.round_trip_ms]))
        _common.log(f"  {codec} full checkpoint ({ev.dirty_pages} pages): "
                    f"{rows[-1]['gbps']} GB/s, socket {rows[-1]['socket_gbps']} GB/s")

        epoch = 0
        for pages, fixed in cases:
            engine_s: list[float] = []
            socket_s: list[float] = []
            rtt_ms: list[float] = []
            last: CheckpointAcked | None = None
            for rep in range(reps + 1):  # the first of each case warms up
                epoch += 1
                domain.permit(pages, fixed)
                if profile is not None and rep:
                    profile.enable()
                t_ack, last = await wait_ack(epoch)
                if profile is not None:
                    profile.disable()
                t = t_ack - domain.resumed_at[epoch]
                s = await limit.transfer(last.bytes_sent)
                if rep:
                    engine_s.append(t)
                    socket_s.append(s)
                    rtt_ms.append(last.round_trip_ms)
            assert last is not None
            rows.append(_row(codec, "delta" if fixed else "random", last, engine_s, socket_s,
                             reps, rtt_ms))
            r = rows[-1]
            _common.log(f"  {codec} {pages} pages: {r['gbps']} GB/s "
                        f"(effective {r['effective_gbps']}), socket {r['socket_gbps']} GB/s, "
                        f"ratio {r['ratio_to_socket']}")
        session.stop()
        domain.finish()
        await session.stopped.wait()
        domain.stop()
    return rows


def _row(codec: str, kind: str, ev: CheckpointAcked, engine_s: list[float],
         socket_s: list[float], reps: int, rtt_ms: list[float]) -> dict[str, Any]:
    t = statistics.median(engine_s)
    s = statistics.median(socket_s)
    return {
        "codec": codec,
        "dirty_pages": ev.dirty_pages,
        "pages_set": kind,
        "bytes_sent": ev.bytes_sent,
        "raw_bytes": ev.raw_bytes,
        "gbps": round(_common.gbps(ev.bytes_sent, t), 3),
        "effective_gbps": round(_common.gbps(ev.raw_bytes, t), 3),
        "socket_gbps": round(_common.gbps(ev.bytes_sent, s), 3),
        "ratio_to_socket": round(s / t, 3),
        "checkpoint_ms": round(t * 1e3, 3),
        "checkpoint_ms_min": round(min(engine_s) * 1e3, 3),
        "socket_ms": round(s * 1e3, 3),
        # The engine's own figure: from just before the first send to the ACK (it
        # leaves out building the frames, which checksums every page first).
        "round_trip_ms": round(statistics.median(rtt_ms), 3),
        "reps": reps,
    }


def stage_breakdown(pages: int, reps: int) -> dict[str, Any]:
    """Where a raw checkpoint's time goes, stage by stage, without sockets.

    One checkpoint of ``pages`` random pages (RAM of exactly ``pages`` pages) through
    the sans-IO protocol by hand: the primary's framing (``send_parts``: checksum),
    the backup's parsing (``receive_data`` in 1 MiB chunks + ``next_event``:
    buffering, checksum verification), ``CheckpointStager.feed`` and the scatter into
    the replica; each as GB/s of page data, with memcpy of the same bytes as a yardstick.
    """
    from tremus.accel import impl
    from tremus.engine import protocol as p

    ram_bytes = pages * PAGE
    ram = random_buffer(ram_bytes)
    replica = prefaulted_buffer(ram_bytes)  # page-aligned, as the backup's
    pc, bc = p.PrimaryConnection(), p.BackupConnection()
    bc.receive_data(pc.send(p.Hello(driver="microvm", ram_size=ram_bytes, page_size=PAGE)))
    assert isinstance(bc.next_event(), p.Hello)
    pc.receive_data(bc.send(p.Welcome()))
    assert isinstance(pc.next_event(), p.Welcome)
    stager = p.CheckpointStager(replica, page_size=PAGE)
    pfns = array("Q", range(pages)).tobytes()
    state = bytes(4096)
    from tremus.transports.codec import split_batches

    times: dict[str, list[float]] = {k: [] for k in ("frame", "parse", "stage", "scatter",
                                                     "memcpy")}
    import gc
    gc.disable()
    try:
        for epoch in range(reps):
            t0 = time.perf_counter()
            parts = list(pc.send_parts(p.CheckpointBegin(epoch, epoch == 0)))
            for bp, bd in split_batches(pfns, memoryview(ram), PAGE):
                parts += pc.send_parts(p.Pages(epoch, bp, bd, "raw"))
            parts += pc.send_parts(p.State(epoch, state))
            parts += pc.send_parts(p.CheckpointEnd(epoch, pages, pages * PAGE, None))
            t1 = time.perf_counter()
            blob = b"".join(parts)
            chunks = [blob[i : i + (1 << 20)] for i in range(0, len(blob), 1 << 20)]
            del blob, parts
            t2 = time.perf_counter()
            events = []
            for chunk in chunks:
                bc.receive_data(chunk)
                while (ev := bc.next_event()) is not p.NEED_DATA:
                    events.append(ev)
            t3 = time.perf_counter()
            done = None
            for ev in events:
                done = stager.feed(ev) or done
            t4 = time.perf_counter()
            assert done is not None
            for batch_pfns, batch_pages in done.batches:  # as the backup applies it
                impl.scatter(replica, batch_pfns, batch_pages, PAGE)
            t5 = time.perf_counter()
            impl.memcpy(replica, ram)
            t6 = time.perf_counter()
            del events, chunks, done
            times["frame"].append(t1 - t0)
            times["parse"].append(t3 - t2)
            times["stage"].append(t4 - t3)
            times["scatter"].append(t5 - t4)
            times["memcpy"].append(t6 - t5)
    finally:
        gc.enable()
    out: dict[str, Any] = {"dirty_pages": pages, "reps": reps}
    for name, ts in times.items():
        out[f"{name}_gbps"] = round(_common.gbps(ram_bytes, statistics.median(ts)), 3)
    return out


def pinning_cpus(pin: bool) -> tuple[int, int] | None:
    """CPUs for (this process, the receiving child) when pinning, else None (not
    asked, or fewer than two CPUs to run on)."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if pin and len(allowed) >= 2 else None


async def run_topology(topology: str, ram: int, raw_pages: list[int], delta_pages: int,
                       reps: int, source: mmap.mmap, profile: cProfile.Profile | None,
                       pin: bool = True) -> list[dict[str, Any]]:
    """All rows with the receiving side (backup and sink) in this process
    (``one_process``: both ends share one Trio thread) or in a child process
    (``two_processes``: each end has its own CPU, as on two hosts)."""
    cpus = pinning_cpus(pin) if topology == "two_processes" else None
    allowed = os.sched_getaffinity(0)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        rows = await _run_topology(topology, ram, raw_pages, delta_pages, reps, source,
                                   profile, None if cpus is None else cpus[1])
    finally:
        os.sched_setaffinity(0, allowed)
    for row in rows:
        row["topology"] = topology
        row["pinned"] = cpus is not None
    return rows


async def _run_topology(topology: str, ram: int, raw_pages: list[int], delta_pages: int,
                        reps: int, source: mmap.mmap, profile: cProfile.Profile | None,
                        child_cpu: int | None) -> list[dict[str, Any]]:
    async with trio.open_nursery() as nursery:
        child: trio.Process | None = None
        if topology == "one_process":
            backup_url, sink_url = await nursery.start(serve)
        else:
            import json

            child = await nursery.start(partial(
                trio.run_process, [sys.executable, __file__, "--serve",
                                   *([] if child_cpu is None else ["--cpu", str(child_cpu)])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            assert child.stdout is not None and child.stdin is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await child.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the --serve child exited")
                line += chunk
            backup_url, sink_url = json.loads(line)
        limit = SocketLimit(source)
        await limit.connect(sink_url)
        _common.log(f"throughput ({topology}): raw, RAM {ram >> 20} MiB")
        rows = await run_codec("raw", ram, [(n, False) for n in raw_pages], reps, backup_url,
                               limit, profile)
        _common.log(f"throughput ({topology}): delta")
        delta_rows = await run_codec("delta", ram, [(delta_pages, True)], reps, backup_url,
                                     limit, None)
        socket_raw = {r["dirty_pages"]: r["socket_gbps"] for r in rows}
        for row in delta_rows:
            if row["pages_set"] == "delta" and row["dirty_pages"] in socket_raw:
                # What delta is for: fewer bytes than raw pages on the same link.
                row["ratio_to_socket_raw"] = round(
                    row["effective_gbps"] / socket_raw[row["dirty_pages"]], 3)
        rows += [r for r in delta_rows if r["pages_set"] == "delta"]
        await limit.aclose()
        if child is not None:
            assert child.stdin is not None
            await child.stdin.aclose()
            await child.wait()
        nursery.cancel_scope.cancel()
    return rows


async def main(quick: bool, smoke: bool, profile_on: bool, pin: bool) -> None:
    ram = 128 << 20
    raw_pages = [1024, 4096, 16384, 32768]
    reps = 20 if not quick else 5
    if smoke:
        ram, raw_pages, reps = 16 << 20, [256], 2
    delta_pages = min(4096, raw_pages[-1])
    profile = cProfile.Profile() if profile_on else None
    source = random_buffer(64 << 20)
    results: list[dict[str, Any]] = []
    for topology in ("one_process", "two_processes"):
        results += await run_topology(topology, ram, raw_pages, delta_pages, reps, source,
                                      profile if topology == "one_process" else None, pin)
    _common.log("throughput: stage breakdown (no sockets)")
    stages = stage_breakdown(256 if smoke else 4096, 10 if quick or smoke else 30)
    _common.log(f"  {stages}")
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        _common.log(out.getvalue())
    _common.emit(
        "throughput", results,
        target={"codec": "raw", "ratio_to_socket_min": 0.7},
        params={"ram_bytes": ram, "page_size": PAGE, "quick": quick, "smoke": smoke,
                "transport": "tcp://127.0.0.1; one_process: primary and backup in one Trio "
                             "run; two_processes: backup (and sink) in a child process",
                "pinned_cpus": pinning_cpus(pin),
                "limit": "Trio TCP stream, same send_all sizes, reader discards, 32-byte ACK",
                "timing": "domain resumed -> CheckpointAcked (encode, checksums, send, "
                          "backup verify + stage + scatter, ACK)"},
        stages=stages,
    )


if __name__ == "__main__":
    parser = _common.arg_parser(__doc__ or "")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="leave both processes of two_processes to the scheduler")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the engine's raw checkpoints in one process (stderr)")
    args = parser.parse_args()
    if args.serve:
        serve_main(args.cpu)
    else:
        trio.run(main, args.quick, args.smoke, args.profile, args.pin)
