"""Typed, immutable events, and the hub that delivers them.

Every step of protection emits an event. Consumers subscribe by ``async for`` over
a subscription, by callback, or read JSON lines from the CLI. Long operations
complete the libxl way (``ao_how``): the caller awaits them, or passes a callback,
or watches for the completion event.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, final

import trio

__all__ = [
    "BackupLost", "BackupReady", "CheckpointAcked", "CheckpointApplied", "CheckpointSent",
    "ConnectionRejected", "Console", "DeviceFailed", "DiskEpochApplied", "DiskEpochDurable",
    "DiskSync", "DomainStarted", "DomainStopped", "Event", "EventHub", "FailoverComplete",
    "FailoverRefused", "FailoverStarted", "Operation", "OperationCancelled", "OperationComplete",
    "OutputReleased", "OwnershipLost", "OwnershipRefused", "OwnershipTaken", "PrimaryConnected",
    "ProtectionStarted", "ProtectionStopped", "ReplicaClosed", "ReplicaOpened", "Subscription",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all events; ``name`` is the JSON ``event`` field."""

    name: ClassVar[str] = "event"
    time: float = field(default_factory=time.time)
    #: The guest the event is about, where one process serves several (a backup
    #: service); empty otherwise, and then left out of the JSON.
    guest: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"event": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "guest" and not value:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            data[f.name] = value
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainStarted(Event):
    name: ClassVar[str] = "domain_started"
    domain: str
    ram_bytes: int
    host: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainStopped(Event):
    name: ClassVar[str] = "domain_stopped"
    reason: str
    host: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Console(Event):
    name: ClassVar[str] = "console"
    line: str
    host: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionStarted(Event):
    name: ClassVar[str] = "protection_started"
    domain: str
    backup: str
    interval_ms: float
    codec: str
    devices: tuple[str, ...]
    #: Checkpoints start early (after ``min_interval_ms``) when output is held.
    output_triggered: bool = False
    min_interval_ms: float = 0.0
    #: How dirty pages are captured: ``"cow"`` (write-protected in the pause, copied
    #: after resume) or ``"copy"`` (copied in the pause).
    capture: str = "copy"
    #: Why ``"copy"`` runs although ``"auto"`` was asked for ("" otherwise).
    capture_note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSent(Event):
    name: ClassVar[str] = "checkpoint_sent"
    epoch: int
    dirty_pages: int
    bytes_sent: int
    pause_us: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointAcked(Event):
    name: ClassVar[str] = "checkpoint_acked"
    epoch: int
    dirty_pages: int
    pause_us: float
    kick_us: float
    bytes_sent: int
    raw_bytes: int
    round_trip_ms: float
    #: Copy-on-write capture: the copy after resume took ``copy_us``, and
    #: ``cow_faults`` guest writes waited for their page to be copied first.
    copy_us: float = 0.0
    cow_faults: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputReleased(Event):
    name: ClassVar[str] = "output_released"
    epoch: int
    packets: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceFailed(Event):
    name: ClassVar[str] = "device_failed"
    device: str
    op: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupLost(Event):
    """The backup is gone; held output is released after ``hold_ms`` (the time the
    backup could still take over), and the guest runs on unprotected."""

    name: ClassVar[str] = "backup_lost"
    reason: str
    last_acked_epoch: int
    hold_ms: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskEpochDurable(Event):
    """Disk epoch N's writes are written and fdatasync'd on the backup (``done`` N)."""

    name: ClassVar[str] = "disk_epoch_durable"
    epoch: int
    writes: int
    bytes: int
    durable_us: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskSync(Event):
    """Progress of making the backup's replica equal to the disk image (primary)."""

    name: ClassVar[str] = "disk_sync"
    disk: str
    done_bytes: int
    total_bytes: int
    sent_bytes: int
    skipped_bytes: int
    complete: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskEpochApplied(Event):
    """Disk epoch N's writes are in the backup's replica image (with memory N)."""

    name: ClassVar[str] = "disk_epoch_applied"
    epoch: int
    writes: int
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnershipTaken(Event):
    """This side now owns the guest in the arbiter (a lease of its own)."""

    name: ClassVar[str] = "ownership_taken"
    key: str
    owner: str
    arbiter: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnershipLost(Event):
    """This side may no longer run the guest: it was stopped here, nothing released.

    With an arbiter: the lease could not be renewed in time, or was taken over.
    Without one: this primary stood still past its backup's takeover window.
    """

    name: ClassVar[str] = "ownership_lost"
    key: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnershipRefused(Event):
    """The arbiter said no: someone else owns the guest (or this backup is no
    longer its standby)."""

    name: ClassVar[str] = "ownership_refused"
    key: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionStopped(Event):
    name: ClassVar[str] = "protection_stopped"
    reason: str
    epochs_acked: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupReady(Event):
    name: ClassVar[str] = "backup_ready"
    listen: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryConnected(Event):
    name: ClassVar[str] = "primary_connected"
    peer: str
    domain: str
    ram_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaOpened(Event):
    """A backup service accepted a primary: it now holds a replica of guest ``guest``."""

    name: ClassVar[str] = "replica_opened"
    guest: str
    peer: str
    ram_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaClosed(Event):
    """A backup service no longer holds guest ``guest``'s replica.

    ``outcome``: ``ended`` (the primary stopped protection), ``failed_over`` (the
    guest now runs here), ``refused`` (nothing to fail over to, or not allowed).
    """

    name: ClassVar[str] = "replica_closed"
    guest: str
    outcome: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRejected(Event):
    """A connection to a backup service was closed without touching any replica
    (garbage, a wrong secret, a failed TLS handshake, a name already taken, ...)."""

    name: ClassVar[str] = "connection_rejected"
    peer: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointApplied(Event):
    name: ClassVar[str] = "checkpoint_applied"
    epoch: int
    pages: int
    bytes_received: int
    apply_us: float
    #: The replica matched the primary's RAM digest (None: no digest was sent).
    verified: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailoverStarted(Event):
    name: ClassVar[str] = "failover_started"
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FailoverComplete(Event):
    name: ClassVar[str] = "failover_complete"
    epoch: int
    downtime_ms: float
    host: str
    #: The disk images the guest now runs on (replicas on this host).
    disks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class FailoverRefused(Event):
    name: ClassVar[str] = "failover_refused"
    reason: str


Callback = Callable[[Event], None]
T = TypeVar("T")


@final
class Subscription:
    """An ``async for`` view of a hub's events from the moment of subscribing.

    The buffer is bounded so a consumer that stops reading cannot exhaust memory;
    when it overflows the oldest events are dropped and ``dropped`` counts them.
    """

    def __init__(self, hub: EventHub, maxlen: int) -> None:
        self._hub = hub
        self._queue: deque[Event] = deque()
        self._maxlen = maxlen
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self.dropped = 0

    def _push(self, event: Event) -> None:
        if len(self._queue) >= self._maxlen:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._lot.unpark_all()

    def close(self) -> None:
        self._closed = True
        self._hub._subscriptions.discard(self)
        self._lot.unpark_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            await self._lot.park()
        return self._queue.popleft()

    async def wait_for(self, kind: type[Event], predicate: Callable[[Any], bool] = lambda e: True) -> Any:
        """The next event of ``kind`` that satisfies ``predicate``."""
        async for event in self:
            if isinstance(event, kind) and predicate(event):
                return event
        raise trio.EndOfChannel(f"subscription closed before a {kind.name} event")


@final
class EventHub:
    """Fan-out of events to callbacks and subscriptions (all on the Trio thread)."""

    def __init__(self) -> None:
        self._callbacks: list[Callback] = []
        self._subscriptions: set[Subscription] = set()

    def emit(self, event: Event) -> None:
        for callback in list(self._callbacks):
            callback(event)
        for subscription in list(self._subscriptions):
            subscription._push(event)

    def add_callback(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def subscribe(self, maxlen: int = 100_000) -> Subscription:
        subscription = Subscription(self, maxlen)
        self._subscriptions.add(subscription)
        return subscription

    def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationComplete(Event):
    """A long operation finished (libxl's ``for_event`` completion)."""

    name: ClassVar[str] = "operation_complete"
    operation: str
    ok: bool
    error: str | None = None
    #: Not carried out because it is not needed (``error`` says why): a backup's
    #: failover after the primary ended protection gracefully, say.
    cancelled: bool = False


class OperationCancelled(Exception):
    """An operation that was not carried out because it is not needed any more."""


@final
class Operation(Generic[T]):
    """A long operation that completes the libxl ``ao_how`` way.

    Three ways to learn the outcome, all always available: ``await op.wait()``;
    ``op.add_done_callback(fn)`` (called on the Trio thread with the operation); or
    the ``OperationComplete`` event on the hub, next to the domain-specific event
    (``ProtectionStarted``, ``FailoverComplete``, ...).
    """

    def __init__(self, name: str, hub: EventHub) -> None:
        self.name = name
        self._hub = hub
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Operation[T]], None]] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        """The value, or the error raised; RuntimeError if not done yet."""
        if not self._done.is_set():
            raise RuntimeError(f"operation {self.name} is not complete")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    async def wait(self) -> T:
        await self._done.wait()
        return self.result()

    def add_done_callback(self, callback: Callable[[Operation[T]], None]) -> None:
        if self._done.is_set():
            callback(self)
        else:
            self._callbacks.append(callback)

    def complete(self, value: T) -> None:
        self._finish(value, None)

    def fail(self, error: BaseException) -> None:
        self._finish(None, error)

    def cancel(self, reason: str) -> None:
        """Complete without doing it, because it is not needed: ``wait()`` raises
        OperationCancelled, and the event says ``cancelled`` (not a failure)."""
        self._finish(None, OperationCancelled(reason))

    def _finish(self, value: T | None, error: BaseException | None) -> None:
        if self._done.is_set():
            return
        self._value, self._error = value, error
        self._done.set()
        self._hub.emit(OperationComplete(operation=self.name, ok=error is None,
                                         error=None if error is None else str(error),
                                         cancelled=isinstance(error, OperationCancelled)))
        for callback in self._callbacks:
            callback(self)
        self._callbacks.clear()
