"""The disk half of output commit, wired for the command line.

On the primary: a domain with a disk gets, per protection session, a disk stream to
the backup (``DiskSender``), block-remus's fifo pair served for it
(``BlockRemusFifo``), and the engine's ``BlockRemusDevice`` driving that fifo — the
engine sees only the device. ``--disk-fifo`` drives an external block-remus disk
through the same device instead. On the backup: disk streams are told from memory
streams by their first bytes and served by a ``DiskReceiver``, which gates the
application of memory checkpoints and prepares the replica image at failover.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, final

import trio

from tremus.buffers import _diskrep_proto as proto
from tremus.buffers.blockremus import BlockRemusDevice, fifo_paths
from tremus.buffers.blockremus_server import BlockRemusFifo
from tremus.buffers.diskrep import DiskReceiver, DiskReplicationError, DiskSender
from tremus.engine.devices import CheckpointDevice
from tremus.engine.events import (
    CheckpointApplied,
    DiskEpochApplied,
    DiskEpochDurable,
    DiskSync,
    Event,
    EventHub,
)

__all__ = [
    "BackupDisks", "GuestDisks", "disk_name", "guest_of_disk", "open_disk_replication", "sniff",
]

#: Fault injection for tests: seconds between disk epoch N durable and memory N applied.
_APPLY_DELAY = float(os.environ.get("TREMUS_INJECT_APPLY_DELAY_MS", "0")) / 1000


async def open_disk_replication(
    domain: Any, stack: AsyncExitStack, *, connect: Callable[[], Any], target: tuple[str, int],
    name: str, secret: bytes | None, run_dir: str | None, timeout: float, hub: EventHub,
) -> list[CheckpointDevice]:
    """Replicate ``domain``'s disk to the backup for one protection session.

    Returns once the backup's replica equals the image (the initial synchronisation)
    and the fifo pair is served: the device returned drives it. Everything stops
    when ``stack`` closes.
    """
    disk = getattr(domain, "disk", None)
    if disk is None:
        return []
    stream = await connect()
    base = domain.suspends

    def progress(done: int, sent: int, skipped: int, complete: bool) -> None:
        hub.emit(DiskSync(disk=disk.path, done_bytes=done, total_bytes=disk.size,
                          sent_bytes=sent, skipped_bytes=skipped, complete=complete))

    sender = DiskSender(disk, lambda: domain.suspends - base, stream, name=name,
                        secret=secret, timeout=timeout, on_progress=progress)
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)
    await nursery.start(sender.run)
    host, port = target
    fifo = BlockRemusFifo(run_dir, host, port, sender.flush, answer_timeout=timeout)
    await nursery.start(fifo.run)
    control, _ = fifo_paths(fifo.run_dir, host, port)
    device = BlockRemusDevice(control, timeout=timeout)

    def output() -> None:
        if device.on_output is not None:
            device.on_output()

    sender.on_output = output
    return [device]


async def sniff(stream: trio.abc.Stream, timeout: float = 10.0
                ) -> tuple[bool, bytes, trio.abc.Stream]:
    """Is ``stream`` a disk stream? Returns (is_disk, bytes already read, stream).

    A plain socket is peeked at (nothing consumed, the memory stream keeps its fast
    receive path); other streams (TLS) hand back what they read first.
    """
    wanted = len(proto.MAGIC)
    with trio.move_on_after(timeout):
        if isinstance(stream, trio.SocketStream):
            while True:
                head = await stream.socket.recv(wanted, socket.MSG_PEEK)
                if len(head) >= wanted or not head or not proto.MAGIC.startswith(head):
                    return head[:wanted] == proto.MAGIC, b"", stream
                await trio.sleep(0.01)
        head = b""
        while len(head) < wanted:
            data = await stream.receive_some(wanted - len(head))
            if not data:
                break
            head += data
            if not proto.MAGIC.startswith(head):
                break
        if head == proto.MAGIC:
            return True, head, stream
        return False, b"", _Prefixed(stream, head)
    return False, b"", stream


class _Prefixed(trio.abc.Stream):
    """A stream whose first bytes were already read (to tell its kind)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


def disk_name(guest: str, index: int = 0) -> str:
    """The name a guest's disk replicates under (its replica is ``NAME.img``)."""
    return f"{guest}-disk{index}"


def guest_of_disk(name: str) -> str:
    return name.rpartition("-disk")[0] or name


@final
class BackupDisks:
    """The backup's disk replicas: one receiver per disk stream, by disk name.

    A disk stream comes before its guest's memory stream (its replica is made equal
    to the image first); the memory session then finds it by the guest's name
    (``for_guest``). ``admit(guest)`` may refuse a disk whose guest is busy here.
    """

    def __init__(self, state_dir: str, hub: EventHub, *, secret: bytes | None,
                 timeout: float, admit: Callable[[str], str | None] | None = None) -> None:
        self._state_dir = state_dir
        self._hub = hub
        self._secret = secret
        self._timeout = timeout
        self._admit = admit
        self.receivers: dict[str, DiskReceiver] = {}

    async def serve(self, stream: trio.abc.Stream, prefix: bytes) -> DiskReceiver:
        """Serve one disk stream until it ends; returns its receiver (``lost`` says why)."""
        receiver: DiskReceiver

        def guest() -> str:
            return guest_of_disk(receiver.name or "")

        def durable(epoch: int, writes: int, nbytes: int, durable_us: float) -> None:
            self._hub.emit(DiskEpochDurable(epoch=epoch, writes=writes, bytes=nbytes,
                                            durable_us=round(durable_us, 1), guest=guest()))

        def applied(epoch: int, writes: int, nbytes: int) -> None:
            self._hub.emit(DiskEpochApplied(epoch=epoch, writes=writes, bytes=nbytes,
                                            guest=guest()))

        def admit(name: str) -> str | None:
            refusal = self._admit(guest_of_disk(name)) if self._admit is not None else None
            if refusal is None:
                previous = self.receivers.get(name)
                if previous is not None:
                    previous.close()
                self.receivers[name] = receiver  # the latest stream of a disk serves it
            return refusal

        receiver = DiskReceiver(self._state_dir, secret=self._secret, on_durable=durable,
                                on_applied=applied, admit=admit)
        await receiver.serve(stream, prefix)
        return receiver

    def for_guest(self, guest: str, hub: EventHub) -> GuestDisks:
        """The disks of ``guest``, for its memory session (whose events go to ``hub``)."""
        return GuestDisks(self, guest, hub)

    def forget(self, guest: str) -> None:
        """``guest``'s protection ended here: close its receivers (the images stay)."""
        name = disk_name(guest)
        receiver = self.receivers.pop(name, None)
        if receiver is not None:
            receiver.close()


@final
class GuestDisks:
    """One guest's replicated disks, as its memory session sees them."""

    def __init__(self, disks: BackupDisks, guest: str, hub: EventHub) -> None:
        self._disks = disks
        self._name = disk_name(guest)
        self._timeout = disks._timeout
        hub.add_callback(self._on_event)

    @property
    def receiver(self) -> DiskReceiver | None:
        return self._disks.receivers.get(self._name)

    def _on_event(self, event: Event) -> None:
        receiver = self.receiver
        if isinstance(event, CheckpointApplied) and receiver is not None:
            receiver.memory_applied(event.epoch)

    async def apply_gate(self, epoch: int) -> bool:
        """Memory checkpoint ``epoch`` waits for disk epoch ``epoch`` to be durable; if
        the disk stream is lost first, it is never applied (the primary, whose disk
        failed, ends protection, or it died: a failover resumes the previous one)."""
        receiver = self.receiver
        if receiver is None:
            return True  # no replicated disk (none, or replicated by other means)
        try:
            await receiver.wait_durable(epoch, self._timeout)
        except DiskReplicationError:
            return False
        if _APPLY_DELAY:
            await trio.sleep(_APPLY_DELAY)  # fault injection: disk durable, memory not yet
        return True

    def prepare_failover(self, epoch: int, config: Mapping[str, Any]) -> Mapping[str, Any]:
        receiver = self.receiver
        if receiver is None or not config.get("disk"):
            return config
        return {**config, "disk": receiver.fail_over(epoch)}
