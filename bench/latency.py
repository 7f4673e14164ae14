"""Request -> reply round trip of the kv guest, unprotected and protected.

Output commit has a price clients pay in latency: a reply produced in epoch N leaves
only when the backup has acknowledged checkpoint N, so it waits for the end of the
epoch (on average half an interval, for a request arriving at a random moment) plus
the checkpoint's round trip. This measures that price on real processes and a real
network: for every configuration a fresh three-host namespace topology
(``tremus/testing/kvnet.py``), ``tremus backup`` on one host, ``tremus protect`` of the
kv guest on another (or ``tremus run``, unprotected), and a UDP client on the third
sending one request at a time (alternating ``SET``/``GET``), each after a random
pause of up to one interval so that requests land at random phases of the epochs.

Rows (``results``): ``netbuf`` is ``unprotected`` (``tremus run``: the limit),
``none`` (``protect --netbuf none --unsafe``: checkpointing pauses, no buffering),
``vmm`` and ``nfqueue``, at ``interval_ms`` 10, 25, 50, 100, 200 (Remus-style: a
checkpoint at the end of every interval, ``output_triggered`` false); then ``vmm``
and ``nfqueue`` with ``--output-triggered`` (``output_triggered`` true,
``min_interval_ms`` 2) at 25, 50, 100, 200: a held reply starts the next checkpoint
at once. Figures: ``rtt_ms_median``, ``rtt_ms_p90``, ``rtt_ms_p99``, ``rtt_ms_mean``
(steadier than the median for a wait spread evenly over an interval),
``ratio_to_unprotected`` (median over the unprotected median, measured in the same
run), ``expected_ms`` (Remus-style: interval / 2 + median checkpoint round trip;
output-triggered: unprotected median + pause + checkpoint round trip), the primary's
median ``ack_rtt_ms``, ``pause_us``, ``kick_us`` (suspend requested -> vCPU
stopped) and ``checkpoints_per_s``, and, per request
(matched to the epoch whose ACK released its reply), the median ``to_send_ms``
(request sent -> that checkpoint's send started: the guest, the wait for the
checkpoint, the pause) and ``release_ms`` (ACK -> reply at the client).

The cost side (``cost``): with ``--interval 200``, a paced client sends ``offered_rps``
requests per second (10, 100, 300, 1000; its own receiver matches replies by key) for a
window after a warm-up, Remus-style (``mode`` ``remus``), ``output_triggered``, and
``unprotected`` (``tremus run``: what the guest and its VMM cost without protection);
at 1000/s also output-triggered with ``--min-interval`` 10 and 25 ms
(``min_interval_ms``), the bound on the checkpoint rate.
Figures: what was achieved (``sent_rps``, ``replied_rps``, ``unanswered``; the guest
runs at ~1M instr/s and may not keep up), the round trip, ``checkpoints_per_s``
(``checkpoint_acked`` events in the window), the primary's CPU in cores
(``cpu_cores``: every thread of the ``tremus`` process; ``cpu_cores_main``: its
main thread, the engine's Trio loop; ``cpu_cores_vcpu``: the vCPU thread, which runs
the guest) and the backup's (``backup_cpu_cores``). The load's window starts after a
warm-up; requests still unanswered some seconds after the last one was sent count as
``unanswered``.

Needs root, ``/dev/kvm`` and (for nfqueue) iptables.

    python bench/latency.py [--quick] > latency.json
    python bench/latency.py --plot latency.json [--png bench/latency.png]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tremus.testing.kvnet import Exchange, KvNet, NsProcess, kv_net  # noqa: E402
from tremus.testing.topology import require_root  # noqa: E402

INTERVALS = (10, 25, 50, 100, 200)
OT_INTERVALS = (25, 50, 100, 200)
# --quick: (netbuf, interval ms, output-triggered)
QUICK_PLAN = [("none", 50, False), ("vmm", 10, False), ("vmm", 200, False),
              ("nfqueue", 200, False), ("vmm", 50, True), ("vmm", 200, True),
              ("nfqueue", 200, True)]
MIN_INTERVAL_MS = 2.0  # tremus protect's default --min-interval
COST_INTERVAL_MS = 200
COST_RATES = (10, 100, 300, 1000)
QUICK_COST_RATES = (100, 1000)
COST_MIN_INTERVALS = (10, 25)  # also at the highest rate, output-triggered, vmm
PNG = Path(__file__).resolve().parent / "latency.png"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _p90(values: list[float]) -> float:
    return _pct(values, 0.9)


def _rtt_figures(rtts: list[float]) -> dict[str, Any]:
    if not rtts:
        return {"rtt_ms_median": None, "rtt_ms_p90": None, "rtt_ms_p99": None,
                "rtt_ms_mean": None, "rtt_ms_min": None}
    return {
        "rtt_ms_median": round(statistics.median(rtts), 2),
        "rtt_ms_p90": round(_p90(rtts), 2),
        "rtt_ms_p99": round(_pct(rtts, 0.99), 2),
        "rtt_ms_mean": round(statistics.fmean(rtts), 2),
        "rtt_ms_min": round(min(rtts), 2),
    }


# -- CPU of a process inside `ip netns exec` -------------------------------------------
def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc stat file after ``(comm)`` (state is field 0)."""
    with open(path) as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def python_pid(proc: NsProcess) -> int:
    """The PID of the Python interpreter running ``tremus`` in ``proc``.

    ``proc`` was started as ``ip netns exec NS python -c ...`` in a session of its
    own; ``ip`` usually execs the command in place, but may fork it (batch mode, other
    versions). Look for the Python process in the session's process group."""
    leader = proc.process.pid
    if _comm(leader).startswith("python"):
        return leader
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(f"/proc/{entry}/stat")
        except OSError:
            continue
        if int(fields[2]) == leader and _comm(int(entry)).startswith("python"):
            return int(entry)
    raise RuntimeError(f"{proc.name}: no Python process in process group {leader}")


def cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = _stat_fields(path)
    return int(fields[11]) + int(fields[12])


def vcpu_thread(pid: int) -> int | None:
    """The micro-VM's vCPU thread: the Trio worker thread running ``_thread_main``
    (Trio names its worker threads after the function they run)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
        except OSError:
            continue
        if comm.startswith("_thread_main"):
            return int(tid)
    return None


@dataclass
class CpuSample:
    pids: dict[str, int]
    at: float = field(default_factory=time.monotonic)
    ticks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, pid in self.pids.items():
            self.ticks[name] = cpu_ticks(pid)
        if "primary" in self.pids:
            pid = self.pids["primary"]
            self.ticks["primary_main"] = cpu_ticks(pid, pid)
            vcpu = vcpu_thread(pid)
            if vcpu is not None:
                self.ticks["primary_vcpu"] = cpu_ticks(pid, vcpu)

    def cores_since(self, earlier: CpuSample) -> dict[str, float]:
        wall = self.at - earlier.at
        return {name: round((self.ticks[name] - earlier.ticks[name]) / CLK_TCK / wall, 3)
                for name in self.ticks}


# -- one request at a time ---------------------------------------------------------
async def _measure(net: KvNet, requests: int, spread_s: float, rng: random.Random
                   ) -> list[Exchange]:
    exchanges = []
    for i in range(requests + 1):
        await trio.sleep(rng.uniform(0, spread_s))
        request = f"SET k{i // 2} v{i}" if i % 2 == 0 else f"GET k{i // 2}"
        exchange = await net.ask(request, timeout=30)
        if i:  # the first one also waits for ARP
            exchanges.append(exchange)
    return exchanges


def _median_of(proc: NsProcess, event: str, key: str) -> float | None:
    values = [e[key] for e in proc.of(event)[1:]]  # the first checkpoint is the whole RAM
    return round(statistics.median(values), 2) if values else None


def _acks_between(proc: NsProcess, t0: float, t1: float) -> list[dict[str, Any]]:
    return [a for a in proc.of("checkpoint_acked")[1:] if t0 <= a["time"] <= t1]


def _decompose(primary: NsProcess, exchanges: list[Exchange]) -> dict[str, Any]:
    """Each reply was released by the ACK of its epoch: the last ACK before it arrived.
    Split its round trip at that checkpoint's send (ACK time - its round trip)."""
    acks = sorted(primary.of("checkpoint_acked"), key=lambda a: a["time"])
    to_send, release = [], []
    for exchange in exchanges:
        before = [a for a in acks if a["time"] <= exchange.t1]
        if not before:
            continue
        ack = before[-1]
        sent_at = ack["time"] - ack["round_trip_ms"] / 1000
        to_send.append((sent_at - exchange.t0) * 1000)
        release.append((exchange.t1 - ack["time"]) * 1000)
    if not to_send:
        return {}
    return {"to_send_ms": round(statistics.median(to_send), 2),
            "release_ms": round(statistics.median(release), 2)}


async def _one(netbuf: str, interval_ms: float | None, requests: int, rng: random.Random,
               *, output_triggered: bool = False) -> dict[str, Any]:
    async with kv_net() as net:
        if netbuf == "unprotected":
            await net.start_unprotected()
            primary = None
        else:
            await net.start_backup()
            extra: tuple[str, ...] = ("--unsafe",) if netbuf == "none" else ()
            if output_triggered:
                extra += ("--output-triggered", "--min-interval", f"{MIN_INTERVAL_MS:g}")
            assert interval_ms is not None
            primary = await net.start_primary(netbuf, interval_ms, *extra)
        spread = (interval_ms or 50) / 1000
        started = time.perf_counter()
        exchanges = await _measure(net, requests, spread, rng)
        took = time.perf_counter() - started
        rtts = [e.rtt_ms for e in exchanges]
        row: dict[str, Any] = {
            "interval_ms": interval_ms,
            "netbuf": netbuf,
            "requests": len(rtts),
            **_rtt_figures(rtts),
        }
        if primary is not None:
            row["output_triggered"] = output_triggered
            if output_triggered:
                row["min_interval_ms"] = MIN_INTERVAL_MS
            # Every ACK up to the last reply is in: wait for one after it.
            last = exchanges[-1].t1
            await primary.wait_for(
                lambda p: any(a["time"] > last for a in p.of("checkpoint_acked")),
                timeout=10, what="an ACK after the last reply")
            lost = primary.of("backup_lost")
            if lost:
                raise RuntimeError(f"{netbuf}@{interval_ms}: backup lost: {lost[0]}")
            row["ack_rtt_ms"] = _median_of(primary, "checkpoint_acked", "round_trip_ms")
            row["pause_us"] = _median_of(primary, "checkpoint_acked", "pause_us")
            row["kick_us"] = _median_of(primary, "checkpoint_acked", "kick_us")
            first = exchanges[0].t0
            row["checkpoints_per_s"] = round(
                len(_acks_between(primary, first, last)) / (last - first), 1)
            if netbuf != "none":
                row.update(_decompose(primary, exchanges))
                if not output_triggered and row["ack_rtt_ms"] is not None:
                    row["expected_ms"] = round(interval_ms / 2 + row["ack_rtt_ms"], 2)
        _common.log(f"  {netbuf:>11}{' OT' if output_triggered else '   '} @ {interval_ms} ms: "
                    f"median {row['rtt_ms_median']} ms, p90 {row['rtt_ms_p90']} ms, "
                    f"p99 {row['rtt_ms_p99']} ms ({took:.1f} s)")
        return row


# -- a paced load: the cost side ---------------------------------------------------
@dataclass
class PacedLoad:
    """Requests sent at a fixed rate, replies matched by key on their own task.

    Three in four requests are ``GET g<seq>`` (a key never set: the reply ``NONE
    g<seq>`` names exactly one request); every fourth is ``SET s<n> v<seq>`` with
    ``n`` cycling over 1000 keys (the guest's table holds 1024), matched first in,
    first out per key - the guest answers in order - and recurring only every 4000
    requests."""

    sent: list[float] = field(default_factory=list)  # t0 by seq
    answered: dict[int, float] = field(default_factory=dict)  # seq -> t1
    _waiting: dict[str, deque[int]] = field(default_factory=dict)

    @staticmethod
    def request(seq: int) -> tuple[str, str]:
        if seq % 4 == 0:
            key = f"s{(seq // 4) % 1000}"
            return key, f"SET {key} v{seq}"
        key = f"g{seq}"
        return key, f"GET {key}"

    async def send(self, net: KvNet, rate: float, count: int, start: float) -> None:
        for seq in range(count):
            await trio.sleep_until(start + seq / rate)
            key, request = self.request(seq)
            self._waiting.setdefault(key, deque()).append(seq)
            self.sent.append(time.time())
            await net.sock.sendto(request.encode(), net.guest)

    async def receive(self, net: KvNet) -> None:
        while True:
            data, addr = await net.sock.recvfrom(2048)
            t1 = time.time()
            parts = data.decode(errors="replace").split()
            if addr != net.guest or len(parts) < 2:
                continue
            waiting = self._waiting.get(parts[1])
            if waiting:
                self.answered[waiting.popleft()] = t1

    @property
    def outstanding(self) -> int:
        return len(self.sent) - len(self.answered)


async def _cost(mode: str, netbuf: str, rate: float, warmup_s: float, window_s: float,
                drain_s: float, min_interval_ms: float = MIN_INTERVAL_MS) -> dict[str, Any]:
    async with kv_net() as net:
        backup = None
        if mode == "unprotected":
            primary = await net.start_unprotected()
        else:
            backup = await net.start_backup()
            extra: tuple[str, ...] = ()
            if mode == "output_triggered":
                extra = ("--output-triggered", "--min-interval", f"{min_interval_ms:g}")
            primary = await net.start_primary(netbuf, COST_INTERVAL_MS, *extra)
        await net.ask("GET warm", timeout=30)  # ARP
        pids = {"primary": python_pid(primary)}
        if backup is not None:
            pids["backup"] = python_pid(backup)
        load = PacedLoad()
        count = round(rate * (warmup_s + window_s))
        samples: list[CpuSample] = []
        windows: list[float] = []

        async def sample_window(start: float) -> None:
            await trio.sleep_until(start + warmup_s)
            windows.append(time.time())
            samples.append(CpuSample(pids))
            await trio.sleep_until(start + warmup_s + window_s)
            windows.append(time.time())
            samples.append(CpuSample(pids))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.receive, net)
            start = trio.current_time() + 0.05
            nursery.start_soon(sample_window, start)
            await load.send(net, rate, count, start)
            with trio.move_on_after(drain_s):
                while load.outstanding:
                    await trio.sleep(0.02)
            while len(samples) < 2:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        w0, w1 = windows
        in_window = [seq for seq, t0 in enumerate(load.sent) if w0 <= t0 < w1]
        rtts = [(load.answered[s] - load.sent[s]) * 1000 for s in in_window if s in load.answered]
        cores = samples[1].cores_since(samples[0])
        row: dict[str, Any] = {
            "mode": mode,
            "netbuf": "unprotected" if mode == "unprotected" else netbuf,
            "interval_ms": None if mode == "unprotected" else COST_INTERVAL_MS,
            "offered_rps": rate,
            "window_s": round(w1 - w0, 2),
            "sent_rps": round(len(in_window) / (w1 - w0), 1),
            "replied_rps": round(sum(1 for t1 in load.answered.values() if w0 <= t1 < w1)
                                 / (w1 - w0), 1),
            "unanswered": len(in_window) - len(rtts),
            **_rtt_figures(rtts),
            "cpu_cores": cores["primary"],
            "cpu_cores_main": cores["primary_main"],
            "cpu_cores_vcpu": cores.get("primary_vcpu"),
        }
        if mode != "unprotected":
            row["min_interval_ms"] = min_interval_ms if mode == "output_triggered" else None
            acks = _acks_between(primary, w0, w1)
            row["checkpoints_per_s"] = round(len(acks) / (w1 - w0), 1)
            row["pause_us"] = (round(statistics.median(a["pause_us"] for a in acks), 1)
                               if acks else None)
            row["kick_us"] = (round(statistics.median(a["kick_us"] for a in acks), 1)
                              if acks else None)
            row["ack_rtt_ms"] = (round(statistics.median(a["round_trip_ms"] for a in acks), 2)
                                 if acks else None)
            row["dirty_pages"] = (statistics.median(a["dirty_pages"] for a in acks)
                                  if acks else None)
            row["backup_cpu_cores"] = cores["backup"]
            lost = primary.of("backup_lost")
            if lost:
                raise RuntimeError(f"{mode} {netbuf} at {rate}/s: backup lost: {lost[0]}")
        _common.log(f"  {mode:>16} {row['netbuf']:>11} {rate:>5g}/s: sent {row['sent_rps']}/s, "
                    f"replied {row['replied_rps']}/s, unanswered {row['unanswered']}, "
                    f"median {row['rtt_ms_median']} ms, "
                    f"{row.get('checkpoints_per_s', '-')} ckpt/s, cpu {row['cpu_cores']} "
                    f"(main {row['cpu_cores_main']}, vCPU {row['cpu_cores_vcpu']}) "
                    f"backup {row.get('backup_cpu_cores', '-')}")
        return row


async def run(quick: bool, smoke: bool = False
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(20240607)
    requests = 5 if smoke else 15 if quick else 200
    netbufs = ["vmm"]
    if smoke:
        pass
    elif shutil.which("iptables"):
        netbufs.append("nfqueue")
    else:
        _common.log("iptables not installed: no nfqueue rows")
    _common.log(f"unprotected baseline ({requests} requests)")
    base = await _one("unprotected", None, requests, rng)
    base["ratio_to_unprotected"] = 1.0
    rows = [base]
    # (netbuf, interval, output-triggered)
    if smoke:
        plan = [("vmm", 50, True)]
    elif quick:
        plan = [row for row in QUICK_PLAN if row[0] in ("none", *netbufs)]
    else:
        plan = [(netbuf, interval, False) for netbuf in ["none", *netbufs]
                for interval in INTERVALS]
        plan += [(netbuf, interval, True) for netbuf in netbufs for interval in OT_INTERVALS]
    for netbuf, interval, triggered in plan:
        row = await _one(netbuf, interval, requests, rng, output_triggered=triggered)
        row["ratio_to_unprotected"] = round(row["rtt_ms_median"] / base["rtt_ms_median"], 1)
        if triggered and row.get("ack_rtt_ms") is not None:
            row["expected_ms"] = round(base["rtt_ms_median"] + row["pause_us"] / 1000
                                       + row["ack_rtt_ms"], 2)
        rows.append(row)

    warmup_s, window_s = (0.3, 0.5) if smoke else (0.3, 1.0) if quick else (1.0, 10.0)
    drain_s = 0.5 if smoke else 1.0 if quick else 3.0
    # (mode, netbuf, offered requests/s, --min-interval)
    cost_plan: list[tuple[str, str, float, float]] = []
    if smoke:
        cost_plan = [("output_triggered", "vmm", 100, MIN_INTERVAL_MS)]
    else:
        for rate in QUICK_COST_RATES if quick else COST_RATES:
            if not quick:
                cost_plan.append(("unprotected", "vmm", rate, MIN_INTERVAL_MS))
            for netbuf in netbufs if not quick else ["vmm"]:
                for mode in ("remus", "output_triggered"):
                    cost_plan.append((mode, netbuf, rate, MIN_INTERVAL_MS))
        if not quick:  # the knob that bounds the checkpoint rate under heavy output
            cost_plan += [("output_triggered", "vmm", max(COST_RATES), ms)
                          for ms in COST_MIN_INTERVALS]
    _common.log(f"cost at {COST_INTERVAL_MS} ms (warm-up {warmup_s} s, window {window_s} s)")
    cost = [await _cost(mode, netbuf, rate, warmup_s, window_s, drain_s, min_ms)
            for mode, netbuf, rate, min_ms in cost_plan]
    return rows, cost


# -- the plot ------------------------------------------------------------------------
def plot(doc: dict[str, Any], png: Path) -> bool:
    """Round trip against interval from a run's JSON; False (with a note) without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        _common.log("plot skipped: matplotlib is not installed "
                    "(pip install matplotlib, or the package's [test] extra)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    base = next((r for r in rows if r["netbuf"] == "unprotected"), None)
    intervals = sorted({r["interval_ms"] for r in rows if r["interval_ms"] is not None})
    if base is not None and intervals:
        ax.axhline(base["rtt_ms_median"], color="black", linestyle=":", linewidth=1.2,
                   label=f"unprotected ({base['rtt_ms_median']:.2f} ms)")
    styles = {
        ("vmm", False): ("Remus-style, vmm", "tab:red", "o", "-"),
        ("nfqueue", False): ("Remus-style, nfqueue", "tab:orange", "s", "--"),
        ("vmm", True): ("output-triggered, vmm", "tab:blue", "o", "-"),
        ("nfqueue", True): ("output-triggered, nfqueue", "tab:cyan", "s", "--"),
        ("none", False): ("checkpointing, output not held (--netbuf none)", "tab:gray", "^", ":"),
    }
    for (netbuf, triggered), (label, color, marker, line) in styles.items():
        series = sorted((r for r in rows if r["netbuf"] == netbuf
                         and bool(r.get("output_triggered")) == triggered),
                        key=lambda r: r["interval_ms"])
        if not series:
            continue
        xs = [r["interval_ms"] for r in series]
        ax.plot(xs, [r["rtt_ms_median"] for r in series], color=color, marker=marker,
                linestyle=line, label=label)
        p90 = [r["rtt_ms_p90"] for r in series]
        ax.fill_between(xs, [r["rtt_ms_median"] for r in series], p90, color=color,
                        alpha=0.12, linewidth=0)
    if intervals:
        ax.plot(intervals, [i / 2 for i in intervals], color="tab:red", alpha=0.35,
                linewidth=0.8, label="interval / 2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(intervals)
    ax.set_xticklabels([f"{i:g}" for i in intervals])
    ax.set_xlabel("checkpoint interval (ms)")
    ax.set_ylabel("client round trip (ms), median; band to p90")
    machine = doc.get("machine", {})
    ax.set_title(f"kv request round trip, protected vs not\n"
                 f"{machine.get('cpu_model', '')}, {machine.get('cores', '?')} cores, "
                 f"{machine.get('date', '')[:10]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    _common.log(f"plot written to {png}")
    return True


def main() -> int:
    parser = _common.arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="JSON", type=Path,
                        help="plot the round trips of a run's JSON output (no run)")
    parser.add_argument("--png", metavar="PATH", type=Path,
                        help=f"where the plot goes (with --plot: default {PNG}; "
                             "with a run: plot the run there)")
    args = parser.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.png or PNG)
        return 0
    why_not = require_root() or (None if os.path.exists("/dev/kvm") else "needs /dev/kvm")
    if why_not is not None:
        _common.log(f"latency: {why_not}")
        return 1
    started = time.perf_counter()
    rows, cost = trio.run(run, args.quick, args.smoke)
    _common.log(f"done in {time.perf_counter() - started:.1f} s")
    _common.emit("latency", rows, quick=args.quick, smoke=args.smoke,
                 cost_interval_ms=COST_INTERVAL_MS, cost=cost)
    if args.png is not None:
        plot({"machine": _common.machine_info(), "results": rows}, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
