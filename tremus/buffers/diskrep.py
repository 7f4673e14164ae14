"""tremus's own replicated disk: block-remus done properly.

The primary side (``DiskSender``) forwards every guest write, tagged with its epoch,
to the backup over a disk stream of its own (``_diskrep_proto``); when the engine
says ``flush`` for epoch N on block-remus's fifo (``BlockRemusFifo``), it sends
EPOCH N after the last write of that epoch and answers ``done`` once the backup
said DONE N — which the backup says only after epoch N's writes are on its disk
(written and fdatasync'd: block-remus answered before). Before the first epoch the
backup's replica is made equal to the image (streamed; chunks the backup already
holds equal are skipped).

The backup side (``DiskReceiver``) appends each write to a log file (memory holds
only the index, so an epoch of any size is bounded by disk, not RAM), makes epoch N
durable on EPOCH N, and applies epochs to the replica image whole and in order,
only when memory checkpoint N has been applied — so that at failover, disk and
memory come from the same checkpoint: every write of the epochs up to the resumed
checkpoint, none after.

Neither side knows which domain it serves: the sender takes a source that has a
``write_hook``, an image path and size, and a function that tells a write's epoch.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, final

import trio

from tremus._groups import collapse_groups
from tremus.accel import impl
from tremus.buffers import _diskrep_proto as d

__all__ = ["DiskReceiver", "DiskReplicationError", "DiskSender", "DiskSource"]

#: Bytes per chunk of the initial synchronisation (and of the backup's hashes).
CHUNK = 1 << 20
#: Bytes of writes gathered into one send.
_BATCH = 1 << 20
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_LOG_RECORD = struct.Struct("<QQI")  # epoch, offset, length; then the data
#: Fault injection for tests: seconds a disk epoch takes to become durable here.
_SLOW_DISK = float(os.environ.get("TREMUS_INJECT_DISK_DELAY_MS", "0")) / 1000
#: Fault injection for tests: the backup cuts the disk stream at this epoch's end.
_CUT_AT = int(os.environ.get("TREMUS_INJECT_DISK_CUT_AT", "-1"))


class DiskReplicationError(Exception):
    """The disk stream failed or broke its protocol; the message says how."""


class DiskSource(Protocol):
    """What the sender needs of a disk (the micro-VM's ``Disk`` is one)."""

    path: str
    size: int
    write_hook: Callable[[int, memoryview], None] | None


@dataclass(slots=True)
class _Epochs:
    """Flush requests the sender has not answered yet, and their waiters."""

    requested: deque[int] = field(default_factory=deque)
    done: dict[int, trio.Event] = field(default_factory=dict)


@final
class DiskSender:
    """The primary's half: streams ``source``'s writes to the backup, epoch by epoch.

    Args:
        source: the disk; its ``write_hook`` is taken over while this runs.
        epoch_of: the epoch a write made now belongs to (called in the writer's thread).
        stream: the disk stream to the backup.
        name: the disk's name on the backup (its replica is ``NAME.img`` there).
        secret: the shared secret of ``--auth-secret-file``, if any.
        timeout: seconds without progress after which the backup is given up.
        on_progress: ``(done, sent, skipped, complete)`` bytes of the initial
            synchronisation, about every 5% and at the end.
    """

    def __init__(self, source: DiskSource, epoch_of: Callable[[], int],
                 stream: trio.abc.Stream, *, name: str, secret: bytes | None = None,
                 timeout: float = 10.0,
                 on_progress: Callable[[int, int, int, bool], None] | None = None) -> None:
        self.source = source
        self._epoch_of = epoch_of
        self._stream = stream
        self._name = name
        self._conn = d.DiskConnection("primary", secret=secret)
        self._timeout = timeout
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, int, bytes]] = deque()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake = trio.Event()
        self._wake_pending = False
        self._notified_epoch = -1
        #: Called (in the writer's thread) on each epoch's first write.
        self.on_output: Callable[[], None] | None = None
        self._epochs = _Epochs()
        self._next_epoch = 0  # the next EPOCH to send
        self._epoch_writes = 0
        self._epoch_bytes = 0
        self.failed: str | None = None
        self._failed = trio.Event()
        self._welcomed = trio.Event()
        self._synced = False
        #: Bytes sent by the initial synchronisation, and skipped as already equal.
        self.synced_bytes = 0
        self.skipped_bytes = 0
        self.writes = 0

    # -- the guest's writes (vCPU thread) ---------------------------------------------
    def _on_write(self, offset: int, data: memoryview) -> None:
        record = (self._epoch_of(), offset, bytes(data))
        if record[0] != self._notified_epoch:
            self._notified_epoch = record[0]
            if self.on_output is not None:
                self.on_output()  # the epoch's first write: the disk holds output
        with self._lock:
            self._queue.append(record)
            wake = not self._wake_pending  # one wake-up for a burst of writes
            self._wake_pending = True
        token = self._token
        if wake and token is not None:
            try:
                token.run_sync_soon(self._wake_up)
            except trio.RunFinishedError:
                pass

    def _wake_up(self) -> None:
        self._wake.set()

    # -- the engine's flushes (through the fifo) --------------------------------------
    async def flush(self, epoch: int) -> bool:
        """``on_flush`` of the fifo: True once epoch ``epoch`` is durable on the backup."""
        if self.failed is not None:
            return False
        done = self._epochs.done.setdefault(epoch, trio.Event())
        self._epochs.requested.append(epoch)
        self._wake.set()
        with trio.move_on_after(self._timeout) as scope:
            async with trio.open_nursery() as nursery:

                async def failed() -> None:
                    await self._failed.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(failed)
                await done.wait()
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            self._fail(f"epoch {epoch} was not durable on the backup within "
                       f"{self._timeout:g} s")
        self._epochs.done.pop(epoch, None)
        return done.is_set() and self.failed is None

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            self._failed.set()

    # -- the stream -------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Handshake, synchronise, then stream writes until cancelled or failed.

        Reports started once the hook is installed (every later write is replicated)
        and the replica is equal to the image: protection may start then.
        """
        self._token = trio.lowlevel.current_trio_token()
        self.source.write_hook = self._on_write
        try:
            with collapse_groups(DiskReplicationError):
                await self._serve(task_status)
        except DiskReplicationError as exc:
            if not self._synced:
                raise
            self._fail(str(exc))
        finally:
            self.source.write_hook = None
            self._fail("disk replication stopped")
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop)
            try:
                await self._handshake_and_sync()
            except trio.TooSlowError:
                raise DiskReplicationError(
                    f"the backup did not answer within {self._timeout:g} s") from None
            except (d.DiskProtocolError, *_IO_ERRORS) as exc:
                raise DiskReplicationError(f"disk synchronisation failed: {exc}") from exc
            self._synced = True
            task_status.started()
            await self._send_loop()

    async def _send(self, event: d.Event) -> None:
        with trio.fail_after(self._timeout):
            for part in self._conn.send(event):
                await self._stream.send_all(part)

    async def _handshake_and_sync(self) -> None:
        source = self.source
        await self._send(d.Hello(self._name, source.size))
        with trio.fail_after(self._timeout):
            await self._welcomed.wait()
        welcome = self._conn.welcome
        assert welcome is not None
        theirs = welcome.hashes
        fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
        step = max(source.size // 20, welcome.chunk)
        reported = 0
        try:
            for index, offset in enumerate(range(0, source.size, welcome.chunk)):
                chunk = await trio.to_thread.run_sync(
                    os.pread, fd, min(welcome.chunk, source.size - offset), offset)
                if theirs[index * 8: index * 8 + 8] == struct.pack("<Q", impl.hash64(chunk)):
                    self.skipped_bytes += len(chunk)
                else:
                    await self._send(d.Sync(offset, chunk))
                    self.synced_bytes += len(chunk)
                done = offset + len(chunk)
                if self._on_progress is not None and done - reported >= step:
                    reported = done
                    self._on_progress(done, self.synced_bytes, self.skipped_bytes, False)
        finally:
            os.close(fd)
        await self._send(d.Synced(source.size))
        if self._on_progress is not None:
            self._on_progress(source.size, self.synced_bytes, self.skipped_bytes, True)

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            with self._lock:
                self._wake_pending = False
            try:
                await self._drain()
            except (d.DiskProtocolError, *_IO_ERRORS, trio.TooSlowError) as exc:
                raise DiskReplicationError(f"sending to the backup failed: {exc}") from exc

    async def _drain(self) -> None:
        """Send what is queued, many frames a write: a burst of small guest writes
        costs one send, not one each."""
        parts: list[bytes | memoryview] = []
        size = 0
        while True:
            with self._lock:
                record = self._queue[0] if self._queue else None
            requested = self._epochs.requested
            if requested and (record is None or record[0] > requested[0]):
                # Every write of that epoch has been sent: the guest was suspended
                # when it was flushed, so none of its writes can still be coming.
                epoch = requested.popleft()
                while self._next_epoch <= epoch:
                    parts += self._conn.send(d.EpochEnd(self._next_epoch, self._epoch_writes,
                                                        self._epoch_bytes))
                    self._next_epoch += 1
                    self._epoch_writes = self._epoch_bytes = 0
                continue
            if record is None:
                break
            with self._lock:
                self._queue.popleft()
            epoch, offset, data = record
            parts += self._conn.send(d.Write(max(epoch, self._next_epoch), offset, data))
            size += len(data)
            self._epoch_writes += 1
            self._epoch_bytes += len(data)
            self.writes += 1
            if size >= _BATCH:
                await self._send_parts(parts)
                parts, size = [], 0
        if parts:
            await self._send_parts(parts)

    async def _send_parts(self, parts: list[bytes | memoryview]) -> None:
        with trio.fail_after(self._timeout):
            await self._stream.send_all(b"".join(parts))

    async def _receive_some(self) -> None:
        data = await self._stream.receive_some(1 << 16)
        self._conn.receive_data(data)
        if not data:
            raise DiskReplicationError("the backup closed the disk stream")

    async def _receive_loop(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is d.NEED_DATA:
                    await self._receive_some()
                    continue
                if isinstance(event, d.Welcome):
                    self._welcomed.set()
                elif isinstance(event, d.Done):
                    waiter = self._epochs.done.get(event.epoch)
                    if waiter is not None:
                        waiter.set()
                elif isinstance(event, d.End):
                    raise DiskReplicationError(f"the backup ended disk replication: "
                                               f"{event.reason}")
        except (d.DiskProtocolError, *_IO_ERRORS) as exc:
            raise DiskReplicationError(f"disk stream from the backup: {exc}") from exc


@dataclass(slots=True)
class _Pending:
    """One epoch's writes, held in the log until the epoch is applied."""

    records: list[tuple[int, int, int]] = field(default_factory=list)  # offset, length, pos
    durable: bool = False


@final
class DiskReceiver:
    """The backup's half: receives a disk stream into a replica under ``state_dir``.

    ``durable`` epochs are in the log and fdatasync'd (DONE was sent); ``applied``
    ones are in the replica image. Memory checkpoint N may be applied only once
    disk epoch N is durable (``wait_durable``); disk epoch N is applied once memory
    checkpoint N is (``memory_applied``); at failover ``fail_over(N)`` applies
    exactly the epochs up to N and discards the rest.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, secret: bytes | None = None,
                 on_durable: Callable[[int, int, int, float], None] | None = None,
                 on_applied: Callable[[int, int, int], None] | None = None,
                 admit: Callable[[str], str | None] | None = None) -> None:
        self._dir = Path(state_dir)
        self._admit = admit
        #: The disk's name (from the primary's HELLO): its replica is ``NAME.img``.
        self.name: str | None = None
        self._conn = d.DiskConnection("backup", secret=secret)
        self._pending: dict[int, _Pending] = {}
        self._durable_through = -1
        self._memory_applied = -1
        self.applied_through = -1
        self._changed = trio.Event()
        self.lost: str | None = None
        self.image: Path | None = None
        self._image_fd = -1
        self._log_fd = -1
        self._log_pos = 0
        self._on_durable = on_durable
        self._on_applied = on_applied
        self.ready = trio.Event()
        self._epoch_started = time.perf_counter()

    # -- the stream -------------------------------------------------------------------
    async def serve(self, stream: trio.abc.Stream, prefix: bytes = b"") -> None:
        """Serve one disk stream until it ends; ``lost`` says why if it failed."""
        conn = self._conn
        if prefix:
            conn.receive_data(prefix)
        try:
            while True:
                event = conn.next_event()
                if event is d.NEED_DATA:
                    data = await stream.receive_some(1 << 20)
                    conn.receive_data(data)
                    if not data and conn.at_eof:
                        raise DiskReplicationError("the primary closed the disk stream")
                    continue
                if isinstance(event, d.Hello):
                    await self._welcome(stream, event)
                elif isinstance(event, d.Sync):
                    await trio.to_thread.run_sync(os.pwrite, self._image_fd, event.data,
                                                  event.offset)
                elif isinstance(event, d.Synced):
                    await trio.to_thread.run_sync(os.fdatasync, self._image_fd)
                    self.ready.set()
                elif isinstance(event, d.Write):
                    self._log(event)
                elif isinstance(event, d.EpochEnd):
                    if event.epoch == _CUT_AT:
                        raise DiskReplicationError("cut by fault injection")
                    await self._make_durable(event)
                    for part in conn.send(d.Done(event.epoch)):
                        await stream.send_all(part)
                elif isinstance(event, d.End):
                    self.lost = f"the primary ended disk replication: {event.reason}"
                    return
        except (d.DiskProtocolError, DiskReplicationError, *_IO_ERRORS) as exc:
            self.lost = f"disk stream: {exc}"
        finally:
            self._changed.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _welcome(self, stream: trio.abc.Stream, hello: d.Hello) -> None:
        if not hello.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise DiskReplicationError(f"bad disk name {hello.name!r}")
        refusal = self._admit(hello.name) if self._admit is not None else None
        if refusal is not None:
            for part in self._conn.send(d.End(refusal)):
                await stream.send_all(part)
            raise DiskReplicationError(f"refused disk {hello.name}: {refusal}")
        self.name = hello.name
        self._dir.mkdir(parents=True, exist_ok=True)
        self.image = self._dir / f"{hello.name}.img"
        fd = os.open(self.image, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._image_fd = fd
        hashes = b""
        if os.fstat(fd).st_size == hello.size:
            hashes = await trio.to_thread.run_sync(_chunk_hashes, fd, hello.size)
        else:
            os.ftruncate(fd, hello.size)
        log = self._dir / f"{hello.name}.log"
        self._log_fd = os.open(log, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        for part in self._conn.send(d.Welcome(CHUNK, hashes)):
            await stream.send_all(part)

    def _log(self, write: d.Write) -> None:
        header = _LOG_RECORD.pack(write.epoch, write.offset, len(write.data))
        os.pwrite(self._log_fd, header + bytes(write.data), self._log_pos)
        pending = self._pending.setdefault(write.epoch, _Pending())
        pending.records.append((write.offset, len(write.data),
                                self._log_pos + _LOG_RECORD.size))
        self._log_pos += _LOG_RECORD.size + len(write.data)

    async def _make_durable(self, end: d.EpochEnd) -> None:
        started = time.perf_counter()
        if _SLOW_DISK:
            await trio.sleep(_SLOW_DISK)  # fault injection: a slow disk on the backup
        await trio.to_thread.run_sync(os.fdatasync, self._log_fd)
        self._pending.setdefault(end.epoch, _Pending()).durable = True
        self._durable_through = end.epoch
        if self._on_durable is not None:
            self._on_durable(end.epoch, end.writes, end.bytes,
                             (time.perf_counter() - started) * 1e6)
        self._changed.set()
        self._changed = trio.Event()
        if end.epoch <= self._memory_applied:
            self._apply_through(end.epoch)

    # -- the engine's side ------------------------------------------------------------
    async def wait_durable(self, epoch: int, timeout: float) -> None:
        """Until disk epoch ``epoch`` is durable here; DiskReplicationError if the
        stream is lost first or ``timeout`` passes."""
        with trio.move_on_after(timeout):
            while self._durable_through < epoch:
                if self.lost is not None:
                    raise DiskReplicationError(
                        f"disk epoch {epoch} never became durable: {self.lost}")
                await self._changed.wait()
            return
        raise DiskReplicationError(f"disk epoch {epoch} was not durable within {timeout:g} s")

    def memory_applied(self, epoch: int) -> None:
        """Memory checkpoint ``epoch`` is in the replica: its disk epochs may follow."""
        self._memory_applied = epoch
        self._apply_through(min(epoch, self._durable_through))

    def fail_over(self, epoch: int) -> str:
        """Make the replica image exactly disk epochs ``..epoch``; returns its path."""
        if self.image is None or not self.ready.is_set():
            raise DiskReplicationError("the disk replica was never synchronised")
        if self._durable_through < epoch:
            raise DiskReplicationError(f"disk epoch {epoch} is not durable here")
        self._apply_through(epoch)
        self._pending.clear()  # later epochs: the checkpoint they belong to never came
        os.fdatasync(self._image_fd)
        return str(self.image)

    def _apply_through(self, epoch: int) -> None:
        applied: list[tuple[int, int, int]] = []
        for number in sorted(n for n in self._pending if n <= epoch):
            pending = self._pending.pop(number)
            for offset, length, pos in pending.records:
                os.pwrite(self._image_fd, os.pread(self._log_fd, length, pos), offset)
            applied.append((number, len(pending.records),
                            sum(length for _, length, _ in pending.records)))
            self.applied_through = number
        if applied:
            os.fdatasync(self._image_fd)  # an epoch is applied whole
            if self._on_applied is not None:
                for number, writes, nbytes in applied:
                    self._on_applied(number, writes, nbytes)

    def close(self) -> None:
        for fd in (self._image_fd, self._log_fd):
            if fd >= 0:
                os.close(fd)
        self._image_fd = self._log_fd = -1


def _chunk_hashes(fd: int, size: int) -> bytes:
    out = bytearray()
    for offset in range(0, size, CHUNK):
        out += struct.pack("<Q", impl.hash64(os.pread(fd, min(CHUNK, size - offset), offset)))
    return bytes(out)
