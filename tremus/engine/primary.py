"""The primary's epoch loop: suspend, copy, resume, send, and commit on ACK.

Per epoch N:

1. wait for the interval, measured from the previous resume; send CHECKPOINT_BEGIN N
   (the backup wakes up while the pages are captured);
2. suspend the domain; ``postsuspend(N)`` on every device (close epoch N's output);
3. read and clear the dirty log; gather those pages into the staging buffer
   (native, GIL released); save the vCPU and device state;
4. ``preresume(N)``; resume — the pause is steps 2..4, with nothing remote in it;
5. send checkpoint N from the staging buffer while the guest runs epoch N+1;
6. on ``ACK N``: ``commit(N)`` on every device (release epoch N's output).

At most ``max_inflight`` checkpoints are unacknowledged (a device such as the plug
qdisc can lower it to 1). When the backup is lost — stream error, EOF, END, or
silence past the heartbeat timeout — the primary tells it so (END, if the connection
still takes it), emits ``BackupLost`` and keeps the guest running, unprotected; what
it holds is released only once the backup can no longer take over: after the
backup's takeover window (learnt in the handshake), or, with an arbiter, once the
standby designation is gone. A primary that may have been replaced — it stood still
past the backup's timeout, or lost its lease — releases nothing and stops the guest
(``OwnershipLost``). The guest is never left suspended because of the backup:
nothing in the pause waits on the network.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import final

import trio

from tremus._cow import CopyOnWrite, CopyStats
from tremus._groups import collapse_groups, leaves
from tremus._memory import prefaulted_buffer
from tremus.accel import impl
from tremus.domains.base import Domain, DomainError
from tremus.engine import protocol as p
from tremus.engine._link import Link
from tremus.engine._stall import StallWatch
from tremus.engine.config import INITIAL_SYNC_PATIENCE, ProtectionConfig
from tremus.engine.devices import CheckpointDevice, DeviceError, DeviceRunner
from tremus.engine.events import (
    BackupLost,
    CheckpointAcked,
    CheckpointSent,
    DeviceFailed,
    EventHub,
    Operation,
    OutputReleased,
    OwnershipLost,
    OwnershipTaken,
    ProtectionStarted,
    ProtectionStopped,
)
from tremus.engine.ownership import Ownership, OwnershipError
from tremus.engine.ownership import OwnershipLost as NotOwner
from tremus.transports.codec import MAX_BATCH_PAGES, DeltaCodec, RawCodec, split_batches

__all__ = ["BackupLostError", "PrimarySession"]

#: How long a primary that gives its backup up tries to tell it (END) before closing.
_END_TIMEOUT = 0.25
#: A last PAGES frame this large does not fit the socket at once (Linux's loopback
#: takes 130-260 KiB a write here): it starts leaving before STATE and END are built.
_SEND_AHEAD_BYTES = 256 << 10

class BackupLostError(Exception):
    """The backup is gone; the message says why."""

    def __init__(self, message: str, *, ended: bool = False) -> None:
        super().__init__(message)
        #: The backup said END: it will not take over, nothing needs holding.
        self.ended = ended


class _Halt(Exception):
    """This primary may have been replaced: stop the guest, release nothing."""


@contextlib.contextmanager
def _halts_first() -> Iterator[None]:
    """Several tasks may decide to halt at once (the lease and the backup lost
    together): a group holding a halt is that halt."""
    try:
        yield
    except BaseExceptionGroup as group:
        halts = [e for e in leaves(group) if isinstance(e, _Halt)]
        if halts:
            raise halts[0] from None
        raise


@dataclass(frozen=True, slots=True)
class _Capture:
    """What the pause captured: the pfns, their pages in the staging buffer, the
    state; how long the pause and the kick took; the copy after it, if any."""

    pfns: memoryview
    state: bytes
    pause_us: float
    kick_us: float
    copied: CopyStats | None
    #: Raw codec: each PAGES frame's checksum (little-endian u64, one per
    #: MAX_BATCH_PAGES pages), computed as the pages were copied.
    frame_sums: bytearray | None


@dataclass(slots=True)
class _Inflight:
    epoch: int
    dirty_pages: int
    pause_us: float
    kick_us: float
    bytes_sent: int
    raw_bytes: int
    sent_at: float
    #: The copy after resume, with copy-on-write capture.
    copied: CopyStats | None = None
    #: When its last byte was handed to the transport (0: still sending).
    sent_done: float = 0.0
    #: Its ``checkpoint_sent`` is out (by the sending task, or by the ACK's handler
    #: when the ACK is read before the sending task runs again).
    announced: bool = False


@final
class PrimarySession:
    """Protects one running domain by checkpointing it over ``stream``.

    Args:
        domain: a running domain (its ``run`` is the caller's task).
        stream: the checkpoint stream to the backup; ``None`` means blackhole —
            checkpoints are built and dropped and count as acknowledged at once
            (``xl remus -b``: for benchmarks, never for protection).
        config: interval, codec, heartbeats, ...
        devices: checkpoint devices (output buffers) driven at every epoch.
        hub: where events go (a new hub if not given).
        backup_name: how the backup is named in events.
        ownership: the arbiter's record of the guest (``--arbiter``): this side
            must own the guest to protect it, and releases output only while its
            lease is held.
    """

    def __init__(
        self,
        domain: Domain,
        stream: trio.abc.Stream | None,
        *,
        config: ProtectionConfig | None = None,
        devices: Sequence[CheckpointDevice] = (),
        hub: EventHub | None = None,
        backup_name: str = "",
        ownership: Ownership | None = None,
    ) -> None:
        self.domain = domain
        self.config = config or ProtectionConfig()
        self.events = hub or EventHub()
        if getattr(stream, "acks_immediately", False):
            stream = None  # transports.connect("blackhole://"): the same as no stream
        self._stream = stream
        self._devices = DeviceRunner(devices)
        self._backup_name = backup_name or ("blackhole" if stream is None else "backup")
        self._conn = p.PrimaryConnection(
            secret=self.config.auth_secret if stream is not None else None)
        self._link = Link(self._conn, stream, BackupLostError, "backup",
                          stall_timeout=self.config.heartbeat_timeout_ms / 1000
                          * INITIAL_SYNC_PATIENCE)
        geometry = domain.geometry
        self._page_size = geometry.page_size
        self._staging: mmap.mmap | None = None  # allocated by run(), in a thread
        self._all_pfns = array("Q", range(geometry.pages)).tobytes()
        self._codec: DeltaCodec | RawCodec = RawCodec(self._page_size)
        self._inflight: dict[int, _Inflight] = {}
        self._inflight_changed = trio.Event()
        self._welcome: p.Welcome | None = None
        self._heartbeat_seq = 0
        self._ram_digest = 0
        self._cow: CopyOnWrite | None = None
        self._capture_note = ""
        self._stop = trio.Event()
        self._lease_lost = trio.Event()
        self._output_waiting = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        if self.config.output_triggered:
            self._devices.notify_output(self._output_held)
        #: Set once ``run`` has finished (END sent, devices torn down).
        self.stopped = trio.Event()
        #: Set when the backup is lost (the guest runs on, unprotected).
        self.lost = trio.Event()
        self._stop_reason = "stopped"
        self._lost: str | None = None
        #: Completes when the backup has accepted protection (or fails if it did not).
        self.protection: Operation[None] = Operation("protect", self.events)
        self.epochs_acked = 0
        self.last_acked_epoch = -1
        self.protected = False
        self._ownership = ownership
        self._stalls = StallWatch(threshold=self.config.heartbeat_timeout_ms / 2000)
        self._link.distrust = self._stalls.stalled_after
        #: Set when this primary stopped the guest because it may have been replaced
        #: (``halt_reason`` says why); nothing held was released.
        self.halted = trio.Event()
        self.halt_reason = ""
        self._last_acked_sent_at = 0.0
        self._last_ack_at = 0.0
        #: ACKs read after this process stood still, held until the backup proves it
        #: still serves us (see _receive_loop).
        self._acks_after_stall: list[int] = []
        #: (seq, when sent) of our recent heartbeats, and the highest seq the backup
        #: echoed: whether it heard us after a given moment.
        self._heartbeats_sent: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=64)
        self._backup_echo = 0

    # -- public ---------------------------------------------------------------------
    def stop(self, reason: str = "stopped by request") -> None:
        """End protection gracefully: the backup is told (END) and does not fail over."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Protect until ``stop()``; reports started once the backup has accepted.

        If the backup is lost the domain keeps running unprotected and ``run`` keeps
        going (held output released) until ``stop()``.
        """
        self._token = trio.lowlevel.current_trio_token()
        crashed = False
        try:
            with collapse_groups():
                async with trio.open_nursery() as guard:
                    guard.start_soon(self._stalls.run)
                    if self._ownership is not None:
                        await self._acquire(self._ownership, guard)
                    try:
                        await self._protect_session(task_status)
                    except _Halt as exc:
                        await self._halt(str(exc))
                    guard.cancel_scope.cancel()
        except (BackupLostError, trio.Cancelled):
            raise
        except BaseException:
            crashed = self.epochs_acked > 0
            raise
        finally:
            with trio.CancelScope(shield=True):
                if crashed and not self.halted.is_set():
                    # Something broke here, not the backup: the buffers are about to
                    # go, and a guest still running would talk past them. Freeze it.
                    with contextlib.suppress(Exception):
                        await self.domain.suspend()
                await self._link.aclose()
                await self._devices.teardown()
                if self._ownership is not None:
                    if not self.halted.is_set():
                        with trio.move_on_after(2), contextlib.suppress(OwnershipError):
                            await self._ownership.resign()
                    await self._ownership.aclose()
            self.protected = False
            self.stopped.set()
            self.events.emit(ProtectionStopped(reason=self._lost or self._stop_reason,
                                               epochs_acked=self.epochs_acked))

    async def _acquire(self, ownership: Ownership, guard: trio.Nursery) -> None:
        try:
            await ownership.acquire(wait=2 * ownership.lease_ttl + 1)
        except OwnershipError as exc:
            self.protection.fail(exc)
            raise BackupLostError(f"cannot own the guest in the arbiter: {exc}") from exc
        self.events.emit(OwnershipTaken(key=ownership.key, owner=ownership.me,
                                        arbiter=ownership.url))

        async def keep() -> None:
            await ownership.keep()
            if ownership.lost.is_set() and not self._stop.is_set():
                self._lease_lost.set()

        guard.start_soon(keep)

    async def _protect_session(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        self._cow, self._capture_note = self._copy_on_write()
        await self._devices.setup()
        try:
            await self._handshake()
            self._staging = await trio.to_thread.run_sync(
                prefaulted_buffer, self.domain.geometry.ram_size)
            self.protected = True
            self.events.emit(ProtectionStarted(
                guest=str(self.domain.config.get("name") or ""),
                capture="cow" if self._cow is not None else "copy",
                capture_note=self._capture_note,
                domain=self.domain.driver, backup=self._backup_name,
                interval_ms=self.config.interval_ms, codec=self._codec.name,
                devices=tuple(d.name for d in self._devices.devices),
                output_triggered=self.config.output_triggered,
                min_interval_ms=self.config.min_interval_ms,
            ))
            task_status.started()
            started = True
            self.protection.complete(None)
            with _halts_first(), collapse_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._protect)
                    nursery.start_soon(self._watch_lease)
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
        except BackupLostError as exc:
            if not started:
                self.protection.fail(exc)
                raise
            await self._backup_lost(exc)
        if self._lost is not None:
            with _halts_first(), collapse_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_lease)
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
        else:
            await self._say_end(self._stop_reason)

    def _copy_on_write(self) -> tuple[CopyOnWrite | None, str]:
        """The domain's copy-on-write capture if ``capture`` allows it and the domain
        offers it, else None and why (``capture="cow"`` without it is an error)."""
        method = self.config.capture
        if method == "copy":
            return None, ""
        offer = getattr(self.domain, "copy_on_write", None)
        if offer is None:
            why = f"the {self.domain.driver} domain does not offer it"
        else:
            try:
                return offer(), ""
            except DomainError as exc:
                why = str(exc)
        if method == "cow":
            raise DomainError(f"capture 'cow': copy-on-write is unavailable: {why}")
        return None, f"copy-on-write is unavailable: {why}"

    async def _watch_lease(self) -> None:
        await self._lease_lost.wait()
        raise _Halt("the arbiter's lease could not be renewed before it could expire: "
                    "another host may own the guest now")

    async def _halt(self, reason: str) -> None:
        """Stop the guest without releasing anything: another host may run it now."""
        self.halt_reason = reason
        self._lost = self._lost or reason
        self.protected = False
        with trio.CancelScope(shield=True):
            await self.domain.suspend()
        self.domain.stop()
        key = self._ownership.key if self._ownership is not None else ""
        self.events.emit(OwnershipLost(key=key, reason=reason))
        self.halted.set()
        self._stop.set()

    # -- handshake ------------------------------------------------------------------
    async def _handshake(self) -> None:
        geometry = self.domain.geometry
        features = ("delta",) if self.config.codec == "delta" else ()
        hello = p.Hello(driver=self.domain.driver, ram_size=geometry.ram_size,
                        page_size=geometry.page_size, config=dict(self.domain.config),
                        features=features, timeout_ms=round(self.config.heartbeat_timeout_ms),
                        arbiter_key=self._ownership.key if self._ownership else "")
        await self._link.send_parts(self._conn.send_parts(hello))
        if self._stream is None:  # blackhole: the backup's answers are made up here
            self._link.feed(p.Welcome(features=features, standby="blackhole"))
        with trio.move_on_after(self._silence_timeout()) as scope:
            event = await self._link.next_event()
        if scope.cancelled_caught:
            raise BackupLostError("the backup did not answer HELLO")
        if isinstance(event, p.End):
            raise BackupLostError(f"the backup refused protection: {event.reason}")
        if isinstance(event, p.ConnectionClosed):
            raise BackupLostError("the backup closed the connection during the handshake")
        if not isinstance(event, p.Welcome):
            raise BackupLostError(f"the backup answered HELLO with {type(event).__name__}")
        self._codec = self._make_codec(set(event.features))
        self._welcome = event
        self._stalls.threshold = min(self.config.heartbeat_timeout_ms, event.timeout_ms) / 2000
        if self._ownership is not None:
            try:
                await self._ownership.designate(event.standby)
            except OwnershipError as exc:
                await self._say_end(f"the primary could not name this backup its standby: {exc}")
                raise BackupLostError(f"naming the backup standby in the arbiter: {exc}") from exc

    def _make_codec(self, features: set[str]) -> DeltaCodec | RawCodec:
        if "delta" in features:
            return DeltaCodec(self.config.delta_cache_pages, self._page_size)
        return RawCodec(self._page_size)

    # -- the protected phase --------------------------------------------------------
    async def _protect(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self._stream is not None:
                    nursery.start_soon(self._receive_loop)
                    nursery.start_soon(self._heartbeat_loop)
                await self._epoch_loop()
        except BaseExceptionGroup as group:
            # Several tasks may notice the same loss (a send and a receive): report the
            # first device failure if any, else the first loss; anything else is a bug.
            found = leaves(group)
            halts = [e for e in found if isinstance(e, _Halt)]
            if halts:
                raise halts[0] from None
            if not all(isinstance(e, BackupLostError | DeviceError) for e in found):
                raise
            device_errors = [e for e in found if isinstance(e, DeviceError)]
            if device_errors:
                error = device_errors[0]
                self.events.emit(DeviceFailed(device=error.device, op=error.op,
                                              message=str(error.cause)))
                with trio.CancelScope(shield=True):
                    await self._say_end(f"primary device failure: {error}")
                # END may not have arrived (a device often fails with the link): hold
                # the output for the backup's takeover window all the same.
                await self._backup_lost(BackupLostError(f"protection stopped: {error}"))
            else:
                lost = found[0]
                assert isinstance(lost, BackupLostError)
                if not lost.ended:
                    # Giving up on a connection that may still take a frame: say so,
                    # so that a backup that was only slow does not take over.
                    with trio.CancelScope(shield=True):
                        await self._say_end(f"the primary gave the backup up: {lost}",
                                            timeout=_END_TIMEOUT)
                await self._backup_lost(lost)

    async def _epoch_loop(self) -> None:
        interval = self.config.interval_ms / 1000
        max_inflight = min(self.config.max_inflight, self._devices.max_inflight)
        epoch = 0
        resumed_at = trio.current_time()
        while True:
            await self._until_next_epoch(resumed_at, interval)
            while len(self._inflight) >= max_inflight:
                self._inflight_changed = trio.Event()
                await self._inflight_changed.wait()
            # Announced before the pause: the backup (often asleep on an idle CPU,
            # whose wake-up took 0.5-1.5 ms on these machines) wakes up while the
            # pages are captured, not when they start to arrive.
            await self._link.send(p.CheckpointBegin(epoch, epoch == 0))
            capture = await self._capture(epoch, full=epoch == 0)
            resumed_at = trio.current_time()
            await self._send_checkpoint(epoch, epoch == 0, capture)
            if self._stream is None:
                self._link.feed(p.Ack(epoch))
                event = self._conn.next_event()
                assert isinstance(event, p.Ack), event
                await self._on_ack(event.epoch)
            epoch += 1

    async def _until_next_epoch(self, resumed_at: float, interval: float) -> None:
        """The interval after the last resume, or, output-triggered, the minimum
        interval once a device holds output of the open epoch."""
        if not self.config.output_triggered:
            await trio.sleep_until(resumed_at + interval)
            return
        with trio.move_on_at(resumed_at + interval):
            await self._output_waiting.wait()
            earliest = resumed_at + self.config.min_interval_ms / 1000
            if trio.current_time() < earliest:  # else no extra trip through the scheduler
                await trio.sleep_until(earliest)

    def _output_held(self) -> None:
        """A device holds output of the open epoch (called from any thread)."""
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._wake_for_output)
            except trio.RunFinishedError:
                pass

    def _wake_for_output(self) -> None:
        self._output_waiting.set()

    async def _capture(self, epoch: int, *, full: bool) -> _Capture:
        """Steps 2-4: the pause (and, copy-on-write, the copy after it). Shielded:
        the guest is always resumed, and pages protected are always copied and
        released."""
        domain = self.domain
        cow = self._cow
        copied: CopyStats | None = None
        encode_state: Callable[[], bytes] | None = None
        state = b""
        pfns: memoryview | None = None
        sums: bytearray | None = None
        with trio.CancelScope(shield=True):
            if cow is not None:
                # Copy-on-write: the vCPU reads its dirty log and protects the pages as
                # it parks (a full checkpoint copies everything in the pause instead).
                cow.at_park = not full
            await domain.suspend()
            stopped = time.perf_counter()
            protected = False
            try:
                await self._devices.postsuspend(epoch)
                # A domain that can give its dirty pages as a bitmap lets copy-on-write
                # protect from it: listing them waits until after the resume.
                read_bitmap = getattr(domain, "read_dirty_bitmap", None)
                if read_bitmap is not None and cow is not None and not full:
                    bitmap, count = read_bitmap()
                    list_dirty = domain.dirty_pfns  # type: ignore[attr-defined]
                else:
                    dirty = domain.read_and_clear_dirty()
                    pfns = memoryview(self._all_pfns) if full else dirty.cast("B")
                    count = len(pfns) // 8
                assert self._staging is not None
                # Raw frames carry checksums of the pages as copied: each page is
                # hashed right after its copy, in the cache, not read again to send.
                sums = (bytearray(8 * -(-count // MAX_BATCH_PAGES))
                        if isinstance(self._codec, RawCodec) else None)
                if cow is not None and count >= cow.min_pages:
                    if pfns is None:
                        cow.protect_bitmap(bitmap)
                    else:
                        cow.protect(pfns)
                    protected = True
                else:
                    if pfns is None:
                        pfns = list_dirty().cast("B")
                    impl.gather(domain.ram, pfns, self._staging, self._page_size,
                                sums, MAX_BATCH_PAGES)
                # A domain that can snapshot its state leaves the encoding (msgpack,
                # ~25 us here) to after the resume.
                snapshot = getattr(domain, "state_snapshot", None)
                encode_state = snapshot() if snapshot is not None else None
                state = b"" if encode_state is not None else domain.save_state()
                if self.config.verify:
                    self._ram_digest = int(impl.hash64(domain.ram))
                await self._devices.preresume(epoch)
                # Output from now on belongs to the next epoch.
                self._output_waiting = trio.Event()
            finally:
                await domain.resume()
                resumed = time.perf_counter()
                if protected:
                    assert cow is not None
                    if pfns is None:
                        pfns = list_dirty().cast("B")
                    copied = await trio.to_thread.run_sync(
                        cow.copy, pfns, self._staging, sums, MAX_BATCH_PAGES)
        assert pfns is not None
        if encode_state is not None:
            state = encode_state()
        # From "vCPU stopped" to "vCPU released", by the domain's own timestamps if
        # it keeps them (the micro-VM does), else as seen from here.
        stopped_ns = getattr(domain, "stopped_at_ns", 0)
        released_ns = getattr(domain, "released_at_ns", 0)
        if copied is not None:
            # The vCPU thread lets the guest run once its protect is done, not before.
            released_ns = max(released_ns, copied.protected_at_ns)
        if stopped_ns and released_ns > stopped_ns:
            pause_us = (released_ns - stopped_ns) / 1e3
        else:
            pause_us = (resumed - stopped) * 1e6
        kick_us = getattr(domain, "kick_latency_ns", 0) / 1000
        return _Capture(pfns, state, pause_us, kick_us, copied, sums)

    async def _send_checkpoint(self, epoch: int, full: bool, capture: _Capture) -> None:
        pfns, state, sums = capture.pfns, capture.state, capture.frame_sums
        count = len(pfns) // 8
        assert self._staging is not None
        pages = memoryview(self._staging)[: count * self._page_size]
        digest = p.checkpoint_digest(pfns, pages, state) if self.config.verify else None
        ram_digest = self._ram_digest if self.config.verify else None
        record = _Inflight(epoch, count, capture.pause_us, capture.kick_us, 0,
                           count * self._page_size, trio.current_time(), capture.copied)
        self._inflight[epoch] = record
        conn, codec = self._conn, self._codec

        def frames() -> Iterator[p.BytesLike | None]:
            # Built one PAGES frame at a time, each written (``None``: flush) before
            # the next is coded: the link builds the next one while the socket
            # drains. STATE and END go with the last PAGES frame (built before its
            # last bytes leave; the backup has the whole checkpoint with its last
            # page); a last frame too large for the socket to take at once starts
            # leaving before they are built. Byte counts are recorded before the
            # last frame leaves: its ACK may be handled before this task runs again.
            coded = 0
            batches = list(split_batches(pfns, pages, self._page_size))
            for index, (batch_pfns, batch_pages) in enumerate(batches, 1):
                data = codec.encode(batch_pages, batch_pfns)
                coded += len(data)
                checksum = (None if sums is None
                            else int.from_bytes(sums[8 * index - 8 : 8 * index], "little"))
                parts = conn.send_parts(p.Pages(epoch, batch_pfns, data, codec.name, checksum))
                if index < len(batches) or len(data) >= _SEND_AHEAD_BYTES:
                    record.bytes_sent += sum(len(part) for part in parts)
                    yield from parts
                    yield None
                    parts = []
            if not batches:
                parts = []
            parts += conn.send_parts(p.State(epoch, state))
            parts += conn.send_parts(p.CheckpointEnd(epoch, count, coded, digest, ram_digest))
            record.bytes_sent += sum(len(part) for part in parts)
            yield from parts

        await self._link.send_parts(frames())
        record.sent_done = trio.current_time()
        self._announce_sent(record)

    def _announce_sent(self, record: _Inflight) -> None:
        """``checkpoint_sent``, once: the ACK's handler emits it first if the ACK was
        read before the sending task came back (the byte count is complete by then)."""
        if record.announced:
            return
        record.announced = True
        self.events.emit(CheckpointSent(epoch=record.epoch, dirty_pages=record.dirty_pages,
                                        bytes_sent=record.bytes_sent,
                                        pause_us=round(record.pause_us, 1)))

    def _silence_timeout(self) -> float:
        """How long the backup may be silent. Until it has acknowledged the first
        (full) checkpoint it may be busy with all of RAM at once, and losing it then
        costs nothing (it could not have failed over): be patient until then."""
        timeout = self.config.heartbeat_timeout_ms / 1000
        return timeout if self.epochs_acked else timeout * INITIAL_SYNC_PATIENCE

    async def _on_ack(self, epoch: int) -> None:
        record = self._inflight.pop(epoch, None)
        if record is None:
            raise BackupLostError(f"ACK for epoch {epoch}, which is not in flight")
        # The backup has the whole checkpoint: it was sent, whether or not the sending
        # task has come back to say so. Events go sent, acked, released.
        self._announce_sent(record)
        if self._ownership is not None:
            await self._while_owner()
        self._last_acked_sent_at = max(self._last_acked_sent_at, record.sent_at)
        self._last_ack_at = trio.current_time()
        # Stamp the ACK's arrival before commit releases anything: the event's time
        # is then a lower bound of when epoch N's output can be seen outside.
        acked_at = time.time()
        round_trip_ms = round((trio.current_time() - record.sent_at) * 1000, 2)
        released = await self._devices.commit(epoch)
        self.epochs_acked += 1
        self.last_acked_epoch = epoch
        self._link.stall_timeout = self._silence_timeout()
        self._inflight_changed.set()
        self.events.emit(CheckpointAcked(
            time=acked_at,
            epoch=epoch, dirty_pages=record.dirty_pages, pause_us=round(record.pause_us, 1),
            kick_us=round(record.kick_us, 1), bytes_sent=record.bytes_sent,
            raw_bytes=record.raw_bytes, round_trip_ms=round_trip_ms,
            copy_us=round(record.copied.copy_us, 1) if record.copied else 0.0,
            cow_faults=record.copied.faults if record.copied else 0,
        ))
        if self._devices.devices:
            self.events.emit(OutputReleased(epoch=epoch, packets=released))

    # -- the backup's side of the stream --------------------------------------------
    async def _receive_loop(self) -> None:
        """ACKs commit their epochs, in order. An ACK read after this process stood
        still for half the backup's timeout or more since its checkpoint was sent may
        have waited in the socket while the backup took us for dead and took over:
        it is held, releasing nothing, until the backup shows it still serves us (it
        echoes a heartbeat we sent after the stall, or acknowledges a checkpoint sent
        after it), or the link fails and this primary halts (``_backup_lost``)."""
        while True:
            event = await self._link.next_event(self._silence_timeout())
            if isinstance(event, p.Ack):
                record = self._inflight.get(event.epoch)
                if self._acks_after_stall or (
                        record is not None and self._stalls.stalled_after(record.sent_at)):
                    self._acks_after_stall.append(event.epoch)
                    if record is None or not self._heard_after_stall(record.sent_at):
                        continue
                    await self._commit_held_acks()
                else:
                    await self._on_ack(event.epoch)
            elif isinstance(event, p.Heartbeat):
                self._backup_echo = max(self._backup_echo, event.echo)
                if self._acks_after_stall and self._heard_after_stall():
                    await self._commit_held_acks()
            elif isinstance(event, p.End):
                raise BackupLostError(f"the backup ended protection: {event.reason}", ended=True)
            elif isinstance(event, p.ConnectionClosed):
                raise BackupLostError("the backup closed the connection")

    def _heard_after_stall(self, sent_at: float | None = None) -> bool:
        """The backup certainly still served us after our last stall: it echoed a
        heartbeat we sent after it, or (``sent_at``) acknowledged a checkpoint sent
        after it."""
        stall_end = self._stalls.last_stall[1]
        if sent_at is not None and sent_at > stall_end:
            return True
        return any(seq <= self._backup_echo and at > stall_end
                   for seq, at in self._heartbeats_sent)

    async def _commit_held_acks(self) -> None:
        held, self._acks_after_stall = self._acks_after_stall, []
        for epoch in held:
            await self._on_ack(epoch)

    async def _heartbeat_loop(self) -> None:
        # Every period, checkpoints or not: each echoes the backup's latest heartbeat,
        # which tells the backup how recently we certainly heard from it.
        period = self.config.heartbeat_ms / 1000
        while True:
            await trio.sleep(period)
            self._check_acks()
            self._heartbeat_seq += 1
            self._heartbeats_sent.append((self._heartbeat_seq, trio.current_time()))
            await self._link.send_parts(self._conn.send_parts(
                p.Heartbeat(self._heartbeat_seq, time.time(),
                            echo=self._conn.their_heartbeat_seq)))

    def _check_acks(self) -> None:
        """A backup that talks but acknowledges nothing is lost too (it cannot apply
        what we send: its disk replica failed, say)."""
        if not self._inflight:
            return
        oldest = self._inflight[min(self._inflight)]
        if not oldest.sent_done:
            return
        waited = trio.current_time() - max(oldest.sent_done, self._last_ack_at)
        limit = 2 * self._silence_timeout()
        if waited > limit:
            raise BackupLostError(f"the backup acknowledged no checkpoint for "
                                  f"{waited * 1000:.0f} ms (limit {limit * 1000:g} ms)")

    async def _while_owner(self) -> None:
        """Returns once the lease is certainly held; halts if it is gone."""
        assert self._ownership is not None
        while not self._ownership.may_release():
            if self._ownership.lost.is_set():
                raise _Halt("the arbiter's lease is gone: another host may own the guest now")
            await trio.sleep(0.01)

    async def _say_end(self, reason: str, timeout: float | None = None) -> None:
        if self._stream is None or self._lost is not None:
            return
        if timeout is None:
            timeout = self.config.heartbeat_timeout_ms / 1000
        with trio.move_on_after(timeout):
            try:
                await self._link.send_parts(self._conn.send_parts(p.End(reason)))
            except (BackupLostError, p.ProtocolError):
                pass

    def _replaced_by_stall(self) -> str | None:
        """Why the backup may have taken over because this primary stood still.

        The backup gives a silent primary up after its timeout. A stall of this
        process of half that or more, not followed by an ACK of a checkpoint sent
        after it, may have been taken for death: then the backup may run the guest.
        """
        welcome = self._welcome
        if welcome is None or not self.epochs_acked:
            return None
        self._stalls.check()
        start, end = self._stalls.last_stall
        if end - start < welcome.timeout_ms / 2000 or end < self._last_acked_sent_at:
            return None
        return (f"this primary stood still for {(end - start) * 1000:.0f} ms (the backup gives "
                f"up after {welcome.timeout_ms} ms) and then lost the backup: the backup may "
                f"run the guest now")

    async def _hold_until_safe(self, lost: BackupLostError) -> None:
        """Wait until the backup can no longer take over."""
        if lost.ended or not self.epochs_acked or self._welcome is None:
            return
        if self._ownership is not None:
            # The arbiter decides: once the standby designation is gone no backup can
            # take over, whatever it holds.
            while True:
                try:
                    await self._ownership.drop_standby()
                    break
                except NotOwner as exc:
                    raise _Halt(f"the backup is lost and this primary no longer owns the "
                                f"guest: {exc}") from exc
                except OwnershipError as exc:
                    if self._ownership.lost.is_set() or not self._ownership.may_release():
                        raise _Halt(f"the backup is lost and the arbiter cannot confirm that "
                                    f"it may not take over: {exc}") from exc
                    await trio.sleep(0.1)
            return
        with trio.move_on_after(self._welcome.takeover_ms / 1000):
            await self._stop.wait()

    async def _backup_lost(self, lost: BackupLostError) -> None:
        if self._lost is not None:
            return
        reason = str(lost)
        self._lost = reason
        self.protected = False
        replaced = None if lost.ended else self._replaced_by_stall()
        if replaced is not None:
            raise _Halt(replaced)
        hold_ms = 0.0
        if not lost.ended and self.epochs_acked and self._welcome is not None:
            hold_ms = (self._welcome.takeover_ms if self._ownership is None else 0.0)
        self.events.emit(BackupLost(reason=reason, last_acked_epoch=self.last_acked_epoch,
                                    hold_ms=hold_ms))
        with trio.CancelScope(shield=True):
            await self._hold_until_safe(lost)
            if self._stop.is_set() and hold_ms:
                return  # stopped within the window: what was held is dropped, never leaked
            try:
                await self._devices.release_all()
            except DeviceError as exc:
                self.events.emit(DeviceFailed(device=exc.device, op=exc.op, message=str(exc.cause)))
        self._inflight.clear()
        self.lost.set()  # only now: the guest runs unprotected, its output flows

