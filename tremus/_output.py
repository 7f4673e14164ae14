"""How the CLI shows events: JSON lines, or a live status with notable events as lines.

A protected guest produces tens of events a second (one set per checkpoint). Printed
one per line they bury what matters (a lost backup, a failover) and the guest's own
console, so in human mode the per-checkpoint events only feed a status summary, and
everything else is one readable line. JSON mode stays one object per event, because
programs (and ``tremus demo``) parse it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TextIO, final

from tremus.engine.events import (
    BackupLost,
    BackupReady,
    CheckpointAcked,
    CheckpointApplied,
    CheckpointSent,
    ConnectionRejected,
    Console,
    DeviceFailed,
    DiskEpochApplied,
    DiskEpochDurable,
    DiskSync,
    DomainStarted,
    DomainStopped,
    Event,
    FailoverComplete,
    FailoverRefused,
    FailoverStarted,
    OperationComplete,
    OutputReleased,
    OwnershipLost,
    OwnershipRefused,
    OwnershipTaken,
    PrimaryConnected,
    ProtectionStarted,
    ProtectionStopped,
    ReplicaClosed,
    ReplicaOpened,
)

__all__ = ["EventPrinter"]

#: Statistics cover this many seconds: long enough to smooth one slow checkpoint,
#: short enough that a stall shows within a couple of seconds.
WINDOW_S = 2.0
#: A terminal's status line is redrawn at most this often: faster is unreadable.
TTY_REFRESH_S = 0.25
#: Without a terminal the status is a log line: this rarely keeps a log readable.
PLAIN_REFRESH_S = 5.0

_CLEAR_LINE = "\r\x1b[K"


@final
class _Series:
    """Timestamped samples of the last ``span`` seconds.

    Rates are measured from the newest sample that already left the window (the
    anchor), so a steady stream reads exactly its rate whatever the window holds,
    and a stream slower than the window still reads right. Until something has left
    the window the first sample is the anchor.
    """

    def __init__(self, span: float) -> None:
        self._span = span
        self._samples: deque[tuple[float, float]] = deque()
        self._anchor: float | None = None

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, at: float, value: float = 0.0) -> None:
        self._samples.append((at, value))

    def clear(self) -> None:
        self._samples.clear()
        self._anchor = None

    def prune(self, now: float) -> None:
        cutoff = now - self._span
        while self._samples and self._samples[0][0] <= cutoff:
            self._anchor = self._samples.popleft()[0]

    def _counted(self) -> tuple[list[float], float] | None:
        """The values measured and since when, or None if nothing is measurable."""
        values = [value for _, value in self._samples]
        start = self._anchor
        if start is None:
            if not values:
                return None
            start = self._samples[0][0]
            values = values[1:]
        return values, start

    def rate(self, now: float) -> float:
        """Samples per second."""
        return self._per_second(now, total=False)

    def throughput(self, now: float) -> float:
        """Sum of the values per second."""
        return self._per_second(now, total=True)

    def _per_second(self, now: float, *, total: bool) -> float:
        counted = self._counted()
        if counted is None:
            return 0.0
        values, start = counted
        if not values:
            return 0.0
        last = self._samples[-1][0]
        # Up to one mean interval after the last sample the next is not overdue; past
        # it, the silence counts, so a stall reads as a falling rate, not a frozen one.
        elapsed = max(last, now - (last - start) / len(values)) - start
        if elapsed <= 0:
            return 0.0
        return (sum(values) if total else len(values)) / elapsed

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile: always a value that was actually observed."""
        if not self._samples:
            return None
        ordered = sorted(value for _, value in self._samples)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]


def _clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _rate_bytes(n: float) -> str:
    """Decimal units, as network throughput is usually quoted."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 999.5:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _size(n: float) -> str:
    """Binary units: memory and disks come in powers of two."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"


@final
class EventPrinter:
    """A hub callback that shows events on ``stream``.

    With ``as_json`` every event is one JSON object per line, exactly as emitted.
    Otherwise per-checkpoint events update a status summary (a line refreshed in
    place on a terminal, an occasional log line elsewhere) and notable events are
    timestamped lines. It runs synchronously on the Trio thread: the status is only
    refreshed when an event arrives, which for a protected guest is many times a
    second.

    ``clock`` gives "now" (same base as events' ``time``) and ``tty`` overrides
    terminal detection; both exist so tests can drive it deterministically.
    """

    def __init__(self, as_json: bool, stream: TextIO | None = None, *,
                 clock: Callable[[], float] = time.time, tty: bool | None = None,
                 window_s: float = WINDOW_S) -> None:
        self._json = as_json
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._tty = self._isatty() if tty is None else tty
        self._us = "µs" if self._can_encode("µ") else "us"
        self._closed = False
        self._status_shown = False
        self._last_draw: float | None = None
        self._last_logged = ""

        self._acked_pause = _Series(window_s)
        self._acked_rtt = _Series(window_s)
        self._acked_bytes = _Series(window_s)
        self._released = _Series(window_s)
        self._applied_us = _Series(window_s)
        self._applied_bytes = _Series(window_s)
        self._disk_bytes = _Series(window_s)
        self._series = (self._acked_pause, self._acked_rtt, self._acked_bytes, self._released,
                        self._applied_us, self._applied_bytes, self._disk_bytes)
        self._reset()

    def _reset(self) -> None:
        """Forget the run: after the domain stops there is nothing live to show."""
        for series in self._series:
            series.clear()
        self._live = False
        self._primary = False
        self._backup = False
        self._released_seen = False
        self._disk_seen = False
        self._protection: str | None = None
        self._running_here = False
        self._halted = False
        self._primary_connected = False
        self._replicas: set[str] = set()
        self._inflight: set[tuple[str, int]] = set()
        self._syncing: dict[str, tuple[int, int]] = {}

    # -- the hub callback ---------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if self._json:
            self._write(json.dumps(event.to_json(), separators=(",", ":"), default=str) + "\n")
            return
        now = self._clock()
        if self._track(event):
            self._live = True
            self._refresh(now)
            return
        line = self._describe(event)
        self._plain(line)
        if isinstance(event, DomainStopped):
            self._end_status()
            self._reset()
        else:
            self._refresh(now, force=True)

    def close(self) -> None:
        """End the status line so what follows (a shell prompt) starts on its own."""
        if self._closed:
            return
        if not self._json:
            self._end_status()
        self._closed = True

    def __enter__(self) -> EventPrinter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------
    def _track(self, event: Event) -> bool:
        """Fold ``event`` into the status; True if that is all it is shown as."""
        guest = getattr(event, "guest", "")
        at = event.time
        if isinstance(event, CheckpointAcked):
            self._primary = True
            self._acked_pause.add(at, event.pause_us)
            self._acked_rtt.add(at, event.round_trip_ms)
            self._acked_bytes.add(at, event.bytes_sent)
            self._inflight = {(g, e) for g, e in self._inflight
                              if g != guest or e > event.epoch}
        elif isinstance(event, CheckpointSent):
            self._primary = True
            self._inflight.add((guest, event.epoch))
        elif isinstance(event, OutputReleased):
            self._released_seen = self._released_seen or event.packets > 0
            self._released.add(at, event.packets)
        elif isinstance(event, CheckpointApplied):
            self._backup = True
            self._applied_us.add(at, event.apply_us)
            self._applied_bytes.add(at, event.bytes_received)
        elif isinstance(event, DiskEpochDurable):
            self._disk_seen = True
            self._disk_bytes.add(at, event.bytes)
        elif isinstance(event, DiskEpochApplied):
            pass
        elif isinstance(event, DiskSync) and not event.complete:
            self._syncing[event.disk] = (event.done_bytes, event.total_bytes)
        else:
            self._transition(event, guest)
            return False
        return True

    def _transition(self, event: Event, guest: str) -> None:
        """What a notable event changes in the status, besides its own line."""
        if isinstance(event, ProtectionStarted):
            self._primary = True
            self._protection = "PROTECTED"
            self._inflight.clear()
        elif isinstance(event, (BackupLost, ProtectionStopped)):
            if self._protection is not None or self._primary:
                self._protection = "UNPROTECTED"
            self._inflight.clear()
        elif isinstance(event, DiskSync):
            self._syncing.pop(event.disk, None)
        elif isinstance(event, BackupReady):
            self._backup = True
        elif isinstance(event, PrimaryConnected):
            self._backup = True
            self._primary_connected = True
        elif isinstance(event, ReplicaOpened):
            self._backup = True
            self._replicas.add(event.guest)
        elif isinstance(event, ReplicaClosed):
            self._replicas.discard(event.guest)
        elif isinstance(event, FailoverRefused):
            self._primary_connected = False
        elif isinstance(event, FailoverComplete):
            self._running_here = True
            self._halted = False
            self._primary_connected = False
        elif isinstance(event, OwnershipLost):
            self._halted = True
            self._running_here = False
            self._protection = None
        else:
            return
        self._live = True

    # -- the status -------------------------------------------------------------------
    def _backup_replicas(self) -> int | None:
        """How many replicas this side holds, or None if it is not (or no longer) a backup."""
        replicas = max(len(self._replicas), int(self._primary_connected))
        if not self._backup or (self._running_here and not replicas):
            return None
        return replicas

    def _status(self, now: float) -> str:
        for series in self._series:
            series.prune(now)
        fields: list[str] = []
        if self._halted:
            fields.append("STOPPED")
        if self._running_here:
            fields.append("RUNNING HERE")
        if self._protection is not None:
            fields.append(self._protection)
        replicas = self._backup_replicas()
        if replicas is not None:
            fields.append(f"BACKUP (replicas {replicas})")
        if self._primary:
            fields += [f"{self._acked_pause.rate(now):.1f} ckpt/s",
                       f"pause p50 {self._us_text(self._acked_pause.percentile(50))}"
                       f" p99 {self._us_text(self._acked_pause.percentile(99))}",
                       f"rtt p50 {self._ms_text(self._acked_rtt.percentile(50))}",
                       f"{_rate_bytes(self._acked_bytes.throughput(now))}/s sent",
                       # Output is held per epoch until its ACK: these epochs' is.
                       f"held output {len(self._inflight)} epochs"]
            if self._released_seen:
                fields.append(f"released {self._released.throughput(now):.0f} pkt/s")
        if replicas is not None:
            fields += [f"{self._applied_us.rate(now):.1f} ckpt/s",
                       f"apply p50 {self._us_text(self._applied_us.percentile(50))}"
                       f" p99 {self._us_text(self._applied_us.percentile(99))}",
                       f"{_rate_bytes(self._applied_bytes.throughput(now))}/s received"]
            if self._disk_seen:
                fields.append(f"disk {_rate_bytes(self._disk_bytes.throughput(now))}/s")
        if self._syncing:
            done = sum(d for d, _ in self._syncing.values())
            total = sum(t for _, t in self._syncing.values())
            fields.append(f"disk sync {100 * done / total if total else 100:.0f}%")
        return "  ".join(fields)

    def _us_text(self, us: float | None) -> str:
        if us is None:
            return "-"
        if us < 999.5:
            return f"{us:.0f} {self._us}"
        if us < 9_999.5:
            return f"{us / 1e3:.2f} ms"
        if us < 99_999.5:
            return f"{us / 1e3:.1f} ms"
        if us < 999_999.5:
            return f"{us / 1e3:.0f} ms"
        return f"{us / 1e6:.2f} s"

    def _ms_text(self, ms: float | None) -> str:
        return self._us_text(None if ms is None else ms * 1e3)

    def _refresh(self, now: float, *, force: bool = False) -> None:
        if self._closed or not self._live:
            return
        last = self._last_draw
        if self._tty:
            due = force or last is None or not 0 <= now - last < TTY_REFRESH_S
            if due:
                self._draw(self._status(now))
                self._last_draw = now
            return
        if last is None:
            self._last_draw = now  # the first log line after a full period, not at once
            return
        if 0 <= now - last < PLAIN_REFRESH_S:
            return
        status = self._status(now)
        self._last_draw = now
        if status != self._last_logged:
            self._last_logged = status
            self._write(f"{_clock_time(now)} {status}\n")

    def _draw(self, status: str) -> None:
        width = self._width()
        if width is not None and len(status) >= width:
            status = status[:max(width - 1, 0)]
        self._write("\r" + status + "\x1b[K")
        self._status_shown = True

    def _end_status(self) -> None:
        if self._tty and self._status_shown and self._live:
            self._draw(self._status(self._clock()))
            self._write("\n")
        self._status_shown = False

    # -- notable events -----------------------------------------------------------------
    def _plain(self, line: str) -> None:
        """A line of its own: on a terminal the status makes way and comes back after."""
        if self._status_shown:
            self._write(_CLEAR_LINE)
            self._status_shown = False
        self._write(line + "\n")

    def _describe(self, event: Event) -> str:
        if isinstance(event, Console):
            return event.line
        text = self._sentence(event)
        if text is None:
            fields = " ".join(f"{k}={v}" for k, v in event.to_json().items()
                              if k not in ("event", "time"))
            text = f"[{event.name}] {fields}".rstrip()
        else:
            guest = getattr(event, "guest", "")
            if guest and not isinstance(event, (ReplicaOpened, ReplicaClosed)):
                text = f"{guest}: {text}"
        return f"{_clock_time(event.time)} {text}"

    def _sentence(self, event: Event) -> str | None:
        """``event`` as a sentence, or None for kinds this printer does not know."""
        if isinstance(event, ProtectionStarted):
            devices = ", ".join(event.devices) or "none"
            text = (f"protection started: {event.domain} -> {event.backup}, checkpoint every "
                    f"{event.interval_ms:g} ms, codec {event.codec}, devices {devices}")
            if event.output_triggered:
                text += f", early on held output (min {event.min_interval_ms:g} ms)"
            return text
        if isinstance(event, ProtectionStopped):
            return (f"protection stopped: {event.reason} "
                    f"({event.epochs_acked} checkpoints acknowledged)")
        if isinstance(event, BackupLost):
            return (f"backup lost: {event.reason}; last acknowledged checkpoint "
                    f"{event.last_acked_epoch}, output held {event.hold_ms:g} ms, "
                    f"then the guest runs unprotected")
        if isinstance(event, FailoverStarted):
            return f"failover started from checkpoint {event.epoch}: {event.reason}"
        if isinstance(event, FailoverComplete):
            text = (f"failover complete: the guest runs on {event.host} from checkpoint "
                    f"{event.epoch}, downtime {self._ms_text(event.downtime_ms)}")
            if event.disks:
                text += f", disks {', '.join(event.disks)}"
            return text
        if isinstance(event, FailoverRefused):
            return f"failover refused: {event.reason}"
        if isinstance(event, DeviceFailed):
            return f"device {event.device} failed ({event.op}): {event.message}"
        if isinstance(event, OwnershipTaken):
            return f"ownership taken: {event.key} is owned by {event.owner} ({event.arbiter})"
        if isinstance(event, OwnershipLost):
            key = f" ({event.key})" if event.key else ""
            return f"ownership lost{key}: {event.reason}"
        if isinstance(event, OwnershipRefused):
            return f"ownership refused ({event.key}): {event.reason}"
        if isinstance(event, ReplicaOpened):
            return (f"replica opened: {event.guest} from {event.peer}, "
                    f"{_size(event.ram_bytes)} RAM")
        if isinstance(event, ReplicaClosed):
            reason = f": {event.reason}" if event.reason else ""
            return f"replica closed: {event.guest} {event.outcome}{reason}"
        if isinstance(event, ConnectionRejected):
            return f"connection rejected from {event.peer}: {event.reason}"
        if isinstance(event, DomainStarted):
            return (f"domain started on {event.host}: {event.domain}, "
                    f"{_size(event.ram_bytes)} RAM")
        if isinstance(event, DomainStopped):
            return f"domain stopped on {event.host}: {event.reason}"
        if isinstance(event, BackupReady):
            return f"backup ready, listening on {event.listen}"
        if isinstance(event, PrimaryConnected):
            return (f"primary connected from {event.peer}: {event.domain}, "
                    f"{_size(event.ram_bytes)} RAM")
        if isinstance(event, OperationComplete):
            if event.ok:
                return f"operation {event.operation} complete"
            if event.cancelled:
                return f"operation {event.operation} not needed: {event.error}"
            return f"operation {event.operation} failed: {event.error}"
        if isinstance(event, DiskSync):
            return (f"disk sync complete: {event.disk}, {_size(event.total_bytes)} "
                    f"({_size(event.sent_bytes)} sent, {_size(event.skipped_bytes)} "
                    f"already equal)")
        return None

    # -- the stream ---------------------------------------------------------------------
    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except BrokenPipeError:
            pass

    def _isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _can_encode(self, text: str) -> bool:
        encoding = getattr(self._stream, "encoding", None)
        if not encoding:
            return True
        try:
            text.encode(encoding)
        except (LookupError, UnicodeEncodeError):
            return False
        return True

    def _width(self) -> int | None:
        """The terminal's width: a status line that wraps cannot be redrawn in place."""
        try:
            columns = os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return None
        return columns if columns > 0 else None
