"""What the CLI prints: JSON lines unchanged, or a live status and readable lines."""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from typing import ClassVar

from tremus._output import EventPrinter
from tremus.engine.events import (
    BackupLost,
    BackupReady,
    CheckpointAcked,
    CheckpointApplied,
    CheckpointSent,
    ConnectionRejected,
    Console,
    DeviceFailed,
    DomainStarted,
    DomainStopped,
    Event,
    FailoverComplete,
    FailoverRefused,
    FailoverStarted,
    OperationComplete,
    OutputReleased,
    OwnershipLost,
    PrimaryConnected,
    ProtectionStarted,
    ProtectionStopped,
    ReplicaClosed,
    ReplicaOpened,
)

T0 = 1_000_000.0
#: 32 checkpoints a second: every time is exact in binary, so window edges are too.
STEP = 1 / 32


@dataclass(frozen=True, slots=True, kw_only=True)
class Surprise(Event):
    name: ClassVar[str] = "surprise"
    detail: str
    count: int


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _hhmmss(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _pause_us(i: int) -> float:
    return 12_500.0 if i % 50 == 0 else 150.0 + (i % 8) * 20


def _rtt_ms(i: int) -> float:
    return 1.5 + (i % 4) * 0.5


def _acked(i: int) -> CheckpointAcked:
    return CheckpointAcked(time=T0 + i * STEP, epoch=i, dirty_pages=10, pause_us=_pause_us(i),
                           kick_us=20.0, bytes_sent=1000 + i, raw_bytes=40960,
                           round_trip_ms=_rtt_ms(i))


def _nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def test_json_mode_is_one_compact_object_per_event() -> None:
    out = io.StringIO()
    printer = EventPrinter(True, out, tty=True)
    events: list[Event] = [
        ProtectionStarted(domain="microvm", backup="b:1", interval_ms=25, codec="delta",
                          devices=("console",)),
        *(_acked(i) for i in range(5)),
        Console(line="count 7", host="h"),
        FailoverComplete(epoch=4, downtime_ms=math.inf, host="h"),
        Surprise(detail="x", count=3),
    ]
    for event in events:
        printer(event)
    printer.close()
    expected = "".join(json.dumps(e.to_json(), separators=(",", ":"), default=str) + "\n"
                       for e in events)
    assert out.getvalue() == expected
    assert json.loads(out.getvalue().splitlines()[-2])["downtime_ms"] is None


def test_a_burst_of_checkpoints_is_a_status_line_with_the_right_figures() -> None:
    out = io.StringIO()
    clock = Clock()
    printer = EventPrinter(False, out, clock=clock, tty=False)
    for i in range(200):
        clock.now = T0 + i * STEP
        printer(_acked(i))
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 2, lines
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()

    # The first log line comes a full 5 s after the first checkpoint (i = 160); it
    # covers the 2 s before it: checkpoints 97..160, measured from 96.
    printed_at = 160
    window = range(printed_at - 63, printed_at + 1)
    line = lines[0]
    assert line.startswith(_hhmmss(T0 + printed_at * STEP) + " ")
    assert "32.0 ckpt/s" in line
    p50 = _nearest_rank([_pause_us(i) for i in window], 50)
    p99 = _nearest_rank([_pause_us(i) for i in window], 99)
    assert (p50, p99) == (210.0, 12_500.0)
    assert f"pause p50 {p50:.0f} µs p99 {p99 / 1000:.1f} ms" in line
    rtt = _nearest_rank([_rtt_ms(i) for i in window], 50)
    assert f"rtt p50 {rtt:.2f} ms" in line
    per_second = sum(1000 + i for i in window) / (len(window) * STEP)
    assert f"{per_second / 1000:.1f} kB/s sent" in line
    assert "held output 0 epochs" in line


def test_held_output_counts_checkpoints_in_flight_and_released_packets() -> None:
    out = io.StringIO()
    clock = Clock()
    printer = EventPrinter(False, out, clock=clock, tty=True)
    printer(ProtectionStarted(time=T0, domain="microvm", backup="b:1", interval_ms=25,
                              codec="delta", devices=("nfqueue",)))
    for i in range(100):
        clock.now = at = T0 + i * STEP
        printer(CheckpointSent(time=at, epoch=i, dirty_pages=1, bytes_sent=100, pause_us=100))
        if i >= 3:
            printer(OutputReleased(time=at, epoch=i - 3, packets=4))
            printer(_acked(i - 3))
    printer.close()
    last = out.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("PROTECTED")
    assert "held output 3 epochs" in last
    assert "released 128 pkt/s" in last


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    out = io.StringIO()
    clock = Clock()
    printer = EventPrinter(False, out, clock=clock, tty=True)
    for i in range(64):  # two seconds
        clock.now = T0 + i * STEP
        printer(_acked(i))
    text = out.getvalue()
    assert "\n" not in text
    draws = text.count("\r")
    assert 2 <= draws <= 2 / 0.25 + 1
    assert text.startswith("\r") and text.endswith("\x1b[K")

    printer(Console(time=clock.now, line="count 41", host="h"))
    after = out.getvalue()[len(text):]
    assert after.startswith("\r\x1b[Kcount 41\n\r")
    assert after.endswith("\x1b[K") and "ckpt/s" in after

    printer.close()
    assert out.getvalue().endswith("\x1b[K\n")
    printer.close()
    assert out.getvalue().endswith("\x1b[K\n") and not out.getvalue().endswith("\n\n")


def test_the_context_manager_finishes_the_status_line() -> None:
    out = io.StringIO()
    with EventPrinter(False, out, clock=Clock(), tty=True) as printer:
        printer(_acked(0))
        assert not out.getvalue().endswith("\n")
    assert out.getvalue().endswith("\n")


def test_the_domain_stopping_ends_the_live_status() -> None:
    out = io.StringIO()
    clock = Clock()
    printer = EventPrinter(False, out, clock=clock, tty=True)
    printer(_acked(0))
    printer(DomainStopped(time=T0, reason="duration elapsed", host="h"))
    assert out.getvalue().endswith(f"\r\x1b[K{_hhmmss(T0)} domain stopped on h: "
                                   f"duration elapsed\n")
    printer.close()
    assert out.getvalue().endswith("duration elapsed\n")


def test_notable_events_are_single_timestamped_lines() -> None:
    out = io.StringIO()
    printer = EventPrinter(False, out, clock=Clock(), tty=False)
    expected = {
        DomainStarted(time=T0, domain="microvm:memory=4M", ram_bytes=4 << 20, host="h"):
            "domain started on h: microvm:memory=4M, 4 MiB RAM",
        ProtectionStarted(time=T0, domain="microvm", backup="b:1", interval_ms=25,
                          codec="delta", devices=("console", "disk")):
            "protection started: microvm -> b:1, checkpoint every 25 ms, codec delta, "
            "devices console, disk",
        ProtectionStarted(time=T0, guest="web", domain="microvm", backup="b:1", interval_ms=25,
                          codec="raw", devices=()):
            "web: protection started: microvm -> b:1, checkpoint every 25 ms, codec raw, "
            "devices none",
        OperationComplete(time=T0, operation="protect", ok=True): "operation protect complete",
        OperationComplete(time=T0, operation="failover", ok=False, cancelled=True,
                          error="the primary ended protection: no failover needed"):
            "operation failover not needed: the primary ended protection: no failover needed",
        OperationComplete(time=T0, operation="protect", ok=False, error="refused"):
            "operation protect failed: refused",
        BackupLost(time=T0, reason="no heartbeat for 500 ms", last_acked_epoch=41,
                   hold_ms=1500.0): "backup lost: no heartbeat for 500 ms; last acknowledged "
                                    "checkpoint 41, output held 1500 ms",
        ProtectionStopped(time=T0, reason="backup lost", epochs_acked=42):
            "protection stopped: backup lost (42 checkpoints acknowledged)",
        BackupReady(time=T0, listen="tcp://0.0.0.0:7000"):
            "backup ready, listening on tcp://0.0.0.0:7000",
        PrimaryConnected(time=T0, peer="10.0.0.1:5000", domain="microvm", ram_bytes=1 << 30):
            "primary connected from 10.0.0.1:5000: microvm, 1 GiB RAM",
        FailoverStarted(time=T0, epoch=41, reason="primary silent"):
            "failover started from checkpoint 41: primary silent",
        FailoverComplete(time=T0, epoch=41, downtime_ms=312.5, host="h2"):
            "failover complete: the guest runs on h2 from checkpoint 41, downtime 312 ms",
        FailoverRefused(time=T0, reason="nothing to fail over to"):
            "failover refused: nothing to fail over to",
        DeviceFailed(time=T0, device="nfqueue", op="commit", message="queue gone"):
            "device nfqueue failed (commit): queue gone",
        OwnershipLost(time=T0, key="vm1", reason="lease expired"):
            "ownership lost (vm1): lease expired",
        ReplicaOpened(time=T0, guest="vm1", peer="10.0.0.1:5000", ram_bytes=64 << 20):
            "replica opened: vm1 from 10.0.0.1:5000, 64 MiB RAM",
        ReplicaClosed(time=T0, guest="vm1", outcome="ended", reason="primary stopped"):
            "replica closed: vm1 ended: primary stopped",
        ConnectionRejected(time=T0, peer="10.9.9.9:1234", reason="bad secret"):
            "connection rejected from 10.9.9.9:1234: bad secret",
    }
    for event in expected:
        printer(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(expected), lines
    for line, sentence in zip(lines, expected.values(), strict=True):
        assert line.startswith(f"{_hhmmss(T0)} {sentence}"), (line, sentence)


def test_console_lines_are_printed_as_they_are() -> None:
    out = io.StringIO()
    printer = EventPrinter(False, out, tty=False)
    printer(Console(line="  count 1234  [guest]", host="h"))
    assert out.getvalue() == "  count 1234  [guest]\n"


def test_unknown_events_fall_back_to_their_fields() -> None:
    out = io.StringIO()
    printer = EventPrinter(False, out, tty=False)
    printer(Surprise(time=T0, detail="odd", count=3))
    assert out.getvalue() == f"{_hhmmss(T0)} [surprise] detail=odd count=3\n"


def test_a_backup_shows_its_replicas_then_the_guest_running_here() -> None:
    out = io.StringIO()
    clock = Clock()
    printer = EventPrinter(False, out, clock=clock, tty=True)
    printer(BackupReady(time=T0, listen="tcp://0.0.0.0:7000"))
    assert out.getvalue().endswith("\rBACKUP (replicas 0)  0.0 ckpt/s  apply p50 - p99 -  "
                                   "0 B/s received\x1b[K")
    printer(PrimaryConnected(time=T0, peer="p:1", domain="microvm", ram_bytes=4 << 20))
    for i in range(64):
        clock.now = at = T0 + i * STEP
        printer(CheckpointApplied(time=at, epoch=i, pages=4, bytes_received=16384,
                                  apply_us=400.0))
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("BACKUP (replicas 1)  32.0 ckpt/s  apply p50 400 µs p99 400 µs  "
                           "524.3 kB/s received")
    printer(FailoverComplete(time=clock.now, epoch=63, downtime_ms=80.0, host="h2"))
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("RUNNING HERE") and "BACKUP" not in last


def test_a_stalled_stream_reads_as_a_falling_rate() -> None:
    out = io.StringIO()
    clock = Clock()
    printer = EventPrinter(False, out, clock=clock, tty=True)
    for i in range(64):
        clock.now = T0 + i * STEP
        printer(_acked(i))
    clock.now = T0 + 63 * STEP + 1.0
    printer(Console(time=clock.now, line="still here", host="h"))
    rate = float(out.getvalue().rsplit("\r", 1)[-1].split("ckpt/s")[0].split()[-1])
    assert 0 < rate < 32
    clock.now += 2.0
    printer(Console(time=clock.now, line="still here", host="h"))
    assert out.getvalue().rsplit("\r", 1)[-1].startswith("0.0 ckpt/s  pause p50 - p99 -")


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError

    def flush(self) -> None:
        raise BrokenPipeError


def test_a_closed_pipe_is_ignored() -> None:
    for as_json, tty in ((True, False), (False, False), (False, True)):
        with EventPrinter(as_json, _ClosedPipe(), clock=Clock(), tty=tty) as printer:
            printer(_acked(0))
            printer(Console(line="x", host="h"))
            printer(BackupLost(reason="gone", last_acked_epoch=0))
