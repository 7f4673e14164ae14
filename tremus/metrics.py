"""Prometheus metrics from a session's events, served over HTTP.

``Metrics`` listens to an ``EventHub`` and keeps its counters, gauges and
histograms in a ``prometheus_client.CollectorRegistry`` of its own (never the
library's global one, so that several sessions, or tests, can live in one
process); ``serve_metrics`` answers ``GET /metrics`` with that registry in the
Prometheus text format, so that protection can be watched and alerted on (a
backup lost, a pause growing, a replica gone) by the monitoring a site already
has.

Labels. Every series carries a ``role`` label, ``role="primary"`` or
``role="backup"``, so that one dashboard can show both sides of a pair; the
per-replica gauges of a backup also carry ``guest="NAME"``.

Each role exports only the metrics that its events can move (a primary's
``tremus_replica`` would always be empty):

- both: ``tremus_checkpoint_pages_total`` and ``tremus_ownership_{taken,lost,refused}_total``;
- primary: ``tremus_checkpoints_{sent,acked}_total``,
  ``tremus_checkpoint_bytes_sent_total``, ``tremus_output_released_packets_total``,
  ``tremus_backup_lost_total``, ``tremus_device_failures_total``,
  ``tremus_protected``, ``tremus_last_acked_epoch``, ``tremus_cow_faults_total``, and
  the histograms ``tremus_pause_seconds``, ``tremus_round_trip_seconds`` and
  ``tremus_cow_copy_seconds``;
- backup: ``tremus_checkpoints_applied_total``,
  ``tremus_checkpoint_bytes_received_total``, ``tremus_failovers_started_total``,
  ``tremus_failovers_total``, ``tremus_failovers_refused_total``,
  ``tremus_disk_epochs_durable_total``, ``tremus_disk_bytes_durable_total``,
  ``tremus_disk_epochs_applied_total``, ``tremus_connections_rejected_total``,
  ``tremus_last_applied_epoch``, ``tremus_last_failover_downtime_seconds``,
  ``tremus_guests_running``, ``tremus_replica{guest}``,
  ``tremus_replica_ram_bytes{guest}``, and the histograms ``tremus_apply_seconds``
  and ``tremus_disk_durable_seconds`` — and, as a backup protects the guests that
  failed over to it (failback) and is then their primary, the primary's metrics too,
  with ``role="primary"``.

Counters keep the names they have always had on the wire (``..._total``).
prometheus_client also exports a ``..._created`` timestamp beside each counter
and histogram; it is left on (turning it off is process-wide) and can be dropped
with the environment variable ``PROMETHEUS_DISABLE_CREATED_SERIES=true``.

The HTTP side is a small Trio handler rather than prometheus_client's
threaded server: the engine is single-threaded Trio, and the registry is only
read on the Trio thread that writes it. Each connection is bounded in time and
size, so a slow, silent or garbage-sending client costs one short-lived task and
never stops the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, final

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tremus.engine.events import (
    BackupLost,
    CheckpointAcked,
    CheckpointApplied,
    CheckpointSent,
    ConnectionRejected,
    DeviceFailed,
    DiskEpochApplied,
    DiskEpochDurable,
    DomainStopped,
    Event,
    EventHub,
    FailoverComplete,
    FailoverRefused,
    FailoverStarted,
    OutputReleased,
    OwnershipLost,
    OwnershipRefused,
    OwnershipTaken,
    ProtectionStarted,
    ProtectionStopped,
    ReplicaClosed,
    ReplicaOpened,
)

__all__ = ["LATENCY_BUCKETS", "ROLES", "Metrics", "serve_metrics"]

#: The roles a ``Metrics`` can have: which side of the pair its events come from.
ROLES: Final = ("primary", "backup")

#: Upper bounds (seconds) of the latency histograms. A checkpoint's pause is
#: typically 100 us to a few ms, a LAN round trip about 1 ms, and the first (full)
#: checkpoint or a loaded host can take a second or more: 1-2.5-5 steps from
#: 100 us to 5 s resolve all of them (``+Inf`` is added by the library).
LATENCY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                          0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: How long one HTTP connection may take, all of it (request in, answer out).
REQUEST_TIMEOUT: Final = 5.0
#: The most of a request that is read; a request head that does not fit is refused.
MAX_REQUEST_BYTES: Final = 8192
#: Connections served at once; more are closed at once (a scraper needs one).
MAX_CONNECTIONS: Final = 64


@final
class Metrics:
    """The metrics of one session (one role), fed by its events.

    Call ``attach(hub)`` to follow a hub; ``render()`` gives the text a scraper
    sees, and ``registry`` is the ``CollectorRegistry`` to serve or embed elsewhere.
    """

    _PAGES_HELP: Final = ("Guest memory pages in acknowledged checkpoints (primary: pages sent "
                          "and acknowledged; backup: pages applied to the replica).")

    def __init__(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self._handlers: dict[type[Event], Callable[[Any], None]] = {}
        self._replicas: set[str] = set()
        self._families: dict[str, Counter] = {}
        self._guests_running = 0

        # Both roles: pages move on both sides, and both may hold an arbiter lease.
        self._pages = self._counter("tremus_checkpoint_pages_total", self._PAGES_HELP)
        self._ownership_taken = self._counter(
            "tremus_ownership_taken_total",
            "Times this side took ownership of the guest in the arbiter (a lease of its own).")
        self._ownership_lost = self._counter(
            "tremus_ownership_lost_total",
            "Times this side lost the right to run the guest (lease not renewed in time, or "
            "taken over) and stopped it here.")
        self._ownership_refused = self._counter(
            "tremus_ownership_refused_total",
            "Times the arbiter refused this side ownership: someone else owns the guest.")
        self._on(OwnershipTaken, lambda e: self._ownership_taken.inc())
        self._on(OwnershipLost, lambda e: self._ownership_lost.inc())
        self._on(OwnershipRefused, lambda e: self._ownership_refused.inc())
        if role == "backup":
            self._init_backup()
        # A backup also protects the guests that failed over to it (failback): it is
        # then their primary, and exports a primary's metrics, role="primary".
        self._init_primary()

    # -- construction -------------------------------------------------------------
    def _counter(self, name: str, documentation: str, role: str | None = None) -> Counter:
        """A counter of ``role`` (this one's by default), at 0 from the start (so that
        rates exist at once). A name both roles use is one family with two series."""
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Counter(name, documentation, ["role"],
                                                    registry=self.registry)
        return family.labels(role or self.role)

    def _gauge(self, name: str, documentation: str, value: float = 0.0,
               role: str | None = None) -> Gauge:
        gauge = Gauge(name, documentation, ["role"], registry=self.registry).labels(
            role or self.role)
        gauge.set(value)
        return gauge

    def _histogram(self, name: str, documentation: str, role: str | None = None) -> Histogram:
        return Histogram(name, documentation, ["role"], registry=self.registry,
                         buckets=LATENCY_BUCKETS).labels(role or self.role)

    def _on(self, kind: type[Event], handler: Callable[[Any], None]) -> None:
        self._handlers[kind] = handler

    def _init_primary(self) -> None:
        role = "primary"
        self._pages_acked = self._counter(
            "tremus_checkpoint_pages_total", self._PAGES_HELP, role)
        self._sent = self._counter(
            "tremus_checkpoints_sent_total",
            "Checkpoints sent to the backup (acknowledged or not yet).", role)
        self._acked = self._counter(
            "tremus_checkpoints_acked_total",
            "Checkpoints the backup acknowledged: each one is a point the guest can fail "
            "over to.", role)
        self._bytes_sent = self._counter(
            "tremus_checkpoint_bytes_sent_total",
            "Bytes of acknowledged checkpoints sent to the backup (after compression).", role)
        self._released = self._counter(
            "tremus_output_released_packets_total",
            "Network packets held until their checkpoint was acknowledged, then released.", role)
        self._backup_lost = self._counter(
            "tremus_backup_lost_total",
            "Times the backup was lost; the guest then runs on unprotected.", role)
        self._device_failures = self._counter(
            "tremus_device_failures_total",
            "Failures of a protected device (a disk or a network output buffer).", role)
        self._protected = self._gauge(
            "tremus_protected",
            "1 while the guest is protected (a backup acknowledges its checkpoints), else 0 "
            "(on a backup: the latest guest that failed over to it and is protected again).",
            role=role)
        self._last_acked = self._gauge(
            "tremus_last_acked_epoch",
            "Epoch of the latest checkpoint the backup acknowledged (-1: none yet).", -1, role)
        self._pause = self._histogram(
            "tremus_pause_seconds",
            "How long the guest was paused to take a checkpoint, in seconds.", role)
        self._round_trip = self._histogram(
            "tremus_round_trip_seconds",
            "Checkpoint round trip, from sending it to the backup's acknowledgement, in "
            "seconds (held output waits this long).", role)
        self._copy = self._histogram(
            "tremus_cow_copy_seconds",
            "Copy-on-write capture: the copy of a checkpoint's pages after the guest "
            "resumed, in seconds (the checkpoint is sent after it).", role)
        self._cow_faults = self._counter(
            "tremus_cow_faults_total",
            "Copy-on-write capture: guest writes that waited for their page to be "
            "copied first.", role)
        self._on(CheckpointSent, lambda e: self._sent.inc())
        self._on(CheckpointAcked, self._checkpoint_acked)
        self._on(OutputReleased, lambda e: self._released.inc(e.packets))
        self._on(ProtectionStarted, lambda e: self._protected.set(1))
        self._on(ProtectionStopped, lambda e: self._protected.set(0))
        self._on(BackupLost, self._backup_gone)
        self._on(DeviceFailed, lambda e: self._device_failures.inc())

    def _init_backup(self) -> None:
        self._applied = self._counter(
            "tremus_checkpoints_applied_total",
            "Checkpoints applied to a replica on this backup.")
        self._bytes_received = self._counter(
            "tremus_checkpoint_bytes_received_total",
            "Bytes of checkpoints received from primaries (as sent, compressed).")
        self._failovers_started = self._counter(
            "tremus_failovers_started_total",
            "Failovers begun: a primary was lost and this backup started to take over.")
        self._failovers = self._counter(
            "tremus_failovers_total",
            "Failovers completed: a guest now runs on this host from its last checkpoint.")
        self._failovers_refused = self._counter(
            "tremus_failovers_refused_total",
            "Failovers refused: no safe checkpoint, fencing failed, or the arbiter said no.")
        self._disk_durable = self._counter(
            "tremus_disk_epochs_durable_total",
            "Disk epochs whose writes are written and fdatasync'd in a replica image.")
        self._disk_bytes_durable = self._counter(
            "tremus_disk_bytes_durable_total",
            "Bytes of disk writes made durable in replica images.")
        self._disk_applied = self._counter(
            "tremus_disk_epochs_applied_total",
            "Disk epochs applied to a replica image together with their memory checkpoint.")
        self._rejected = self._counter(
            "tremus_connections_rejected_total",
            "Connections closed without touching any replica (garbage, a wrong secret, a "
            "failed TLS handshake, a guest name already taken, ...).")
        self._last_applied = self._gauge(
            "tremus_last_applied_epoch",
            "Epoch of the latest checkpoint applied to a replica (-1: none yet).", -1)
        self._downtime = self._gauge(
            "tremus_last_failover_downtime_seconds",
            "Downtime of the latest failover: from the last word of the primary to the "
            "guest running here, in seconds.")
        self._running = self._gauge(
            "tremus_guests_running",
            "Guests running on this host after failing over to it.")
        self._replica = Gauge(
            "tremus_replica",
            "1 while this backup holds the replica of guest GUEST (the series is removed "
            "when the replica is closed).", ["role", "guest"], registry=self.registry)
        self._replica_ram = Gauge(
            "tremus_replica_ram_bytes",
            "RAM size, in bytes, of the replica of guest GUEST held by this backup.",
            ["role", "guest"], registry=self.registry)
        self._apply = self._histogram(
            "tremus_apply_seconds",
            "How long this backup took to apply one checkpoint to a replica, in seconds.")
        self._disk_durable_time = self._histogram(
            "tremus_disk_durable_seconds",
            "How long one disk epoch took to become durable in a replica image, in seconds.")
        self._on(CheckpointApplied, self._checkpoint_applied)
        self._on(FailoverStarted, lambda e: self._failovers_started.inc())
        self._on(FailoverComplete, self._failover_complete)
        self._on(FailoverRefused, lambda e: self._failovers_refused.inc())
        self._on(DomainStopped, self._domain_stopped)
        self._on(DiskEpochDurable, self._disk_epoch_durable)
        self._on(DiskEpochApplied, lambda e: self._disk_applied.inc())
        self._on(ReplicaOpened, self._replica_opened)
        self._on(ReplicaClosed, self._replica_closed)
        self._on(ConnectionRejected, lambda e: self._rejected.inc())

    # -- events ---------------------------------------------------------------------
    def attach(self, hub: EventHub) -> Callable[[], None]:
        """Follow ``hub``'s events from now on; returns a function that stops it."""
        return hub.add_callback(self.observe)

    def observe(self, event: Event) -> None:
        """Account for one event; events that do not apply to this role are ignored."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _checkpoint_acked(self, event: CheckpointAcked) -> None:
        self._acked.inc()
        self._bytes_sent.inc(event.bytes_sent)
        self._pages_acked.inc(event.dirty_pages)
        self._last_acked.set(event.epoch)
        self._pause.observe(_seconds(event.pause_us / 1e6))
        self._round_trip.observe(_seconds(event.round_trip_ms / 1e3))
        if event.copy_us:
            self._copy.observe(_seconds(event.copy_us / 1e6))
            self._cow_faults.inc(event.cow_faults)

    def _backup_gone(self, event: BackupLost) -> None:
        self._protected.set(0)
        self._backup_lost.inc()

    def _checkpoint_applied(self, event: CheckpointApplied) -> None:
        self._applied.inc()
        self._pages.inc(event.pages)
        self._bytes_received.inc(event.bytes_received)
        self._last_applied.set(event.epoch)
        self._apply.observe(_seconds(event.apply_us / 1e6))

    def _failover_complete(self, event: FailoverComplete) -> None:
        self._failovers.inc()
        self._downtime.set(_seconds(event.downtime_ms / 1e3))
        self._guests_running += 1
        self._running.set(self._guests_running)

    def _domain_stopped(self, event: DomainStopped) -> None:
        # On a backup only a failed-over guest runs, so a stop is one of those; the
        # floor keeps a stray stop (none failed over) from showing -1.
        if self._guests_running > 0:
            self._guests_running -= 1
            self._running.set(self._guests_running)

    def _disk_epoch_durable(self, event: DiskEpochDurable) -> None:
        self._disk_durable.inc()
        self._disk_bytes_durable.inc(event.bytes)
        self._disk_durable_time.observe(_seconds(event.durable_us / 1e6))

    def _replica_opened(self, event: ReplicaOpened) -> None:
        self._replicas.add(event.guest)
        self._replica.labels(self.role, event.guest).set(1)
        self._replica_ram.labels(self.role, event.guest).set(event.ram_bytes)

    def _replica_closed(self, event: ReplicaClosed) -> None:
        # Remove the series rather than set 0: a closed replica is not a replica at 0,
        # and guests come and go, so zeros would pile up for ever.
        if event.guest in self._replicas:
            self._replicas.discard(event.guest)
            self._replica.remove(self.role, event.guest)
            self._replica_ram.remove(self.role, event.guest)

    # -- exposition -----------------------------------------------------------------
    def render(self) -> str:
        """The Prometheus text exposition of this registry (what ``GET /metrics`` shows)."""
        return generate_latest(self.registry).decode()


def _seconds(value: float) -> float:
    """An event's duration for a histogram: a NaN or negative one (a clock step, a
    missing value) would poison ``_sum`` for ever, so it counts as 0."""
    return value if math.isfinite(value) and value > 0 else 0.0


_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found",
                   405: "Method Not Allowed", 431: "Request Header Fields Too Large"}


def _response(status: int, body: bytes, content_type: str, *, head_only: bool = False,
              extra: str = "") -> bytes:
    head = (f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode()
    return head if head_only else head + body


def _answer(metrics: Metrics, request: bytes) -> bytes:
    """The whole HTTP response to a complete request head ``request``."""
    line = request.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    text = "text/plain; charset=utf-8"
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, b"bad request\n", text)
    method, target, _ = parts
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"only GET /metrics\n", text, extra="Allow: GET, HEAD\r\n")
    head_only = method == b"HEAD"
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response(404, b"not found: try /metrics\n", text, head_only=head_only)
    return _response(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST,
                     head_only=head_only)


async def _read_request(stream: trio.SocketStream, max_bytes: int) -> bytes | None:
    """The request head (up to the blank line), or b"" if it exceeds ``max_bytes``,
    or None if the client closed its side first (nothing to answer)."""
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        if len(request) >= max_bytes:
            return b""
        chunk = await stream.receive_some(max_bytes - len(request))
        if not chunk:
            return None
        request += chunk
    return request


async def serve_metrics(metrics: Metrics, host: str, port: int, *,
                        timeout: float = REQUEST_TIMEOUT,
                        max_request_bytes: int = MAX_REQUEST_BYTES,
                        max_connections: int = MAX_CONNECTIONS,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``GET /metrics`` on HOST:PORT until cancelled; reports the bound port.

    Binding happens before ``task_status.started()``, so an address in use raises
    OSError to the caller of ``nursery.start`` (the CLI reports it and exits)
    instead of failing later in the background. Each connection gets ``timeout``
    seconds and ``max_request_bytes`` of request head; errors of one connection
    end that connection only.
    """
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= max_connections:
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            async with stream:
                with trio.move_on_after(timeout):
                    await _exchange(stream)
        except (trio.BrokenResourceError, OSError):
            pass  # the client went away (reset, broken pipe): its loss only
        finally:
            active -= 1

    async def _exchange(stream: trio.SocketStream) -> None:
        request = await _read_request(stream, max_request_bytes)
        if request is None:
            return
        if request == b"":
            reply = _response(431, b"request too large\n", "text/plain; charset=utf-8")
        else:
            reply = _answer(metrics, request)
        await stream.send_all(reply)
        # Close gracefully: shut our side, then read what the client still sends (up
        # to the deadline) so that closing with unread input does not reset the
        # connection and destroy the answer before the client has read it.
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
