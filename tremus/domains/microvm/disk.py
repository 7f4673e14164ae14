"""The micro-VM's paravirtual block device over a raw image file (ABI: ``guest/ABI.md``).

The guest puts a request descriptor (``struct disk_req``) in its RAM and writes its
guest-physical address to the doorbell port ``PORT_DISK``. The VMM performs the
request synchronously during that exit, in the vCPU thread — ``pread`` straight into
guest RAM, ``pwrite`` straight from it, ``fdatasync`` for a flush; no I/O threads —
and writes the status into the descriptor before the guest runs again. Whatever the
VMM writes into guest RAM (read data, the status word) is marked dirty, so the next
checkpoint carries it (KVM's dirty log does not see host writes).

Replication hooks (installed by whoever replicates the disk; called in the vCPU
thread, while the guest waits for its request):

- ``write_hook(offset, data)`` for every write that reached the image, *before* the
  guest learns its status;
- ``flush_hook()`` for every flush, after the image's ``fdatasync``, before the
  guest learns its status.

A hook that raises fails the request with ``DISK_E_IO`` (the exception is kept in
``last_error``).

The device's persist state is its size, its counters and the restore generation,
which ``restore`` bumps so that the guest can tell it was restored and check its
disk. The image itself is not device state: a backup restores the machine on its
own replica of it (the configuration's ``disk`` path).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any, final

from tremus.domains.base import DomainError
from tremus.domains.microvm import abi

__all__ = ["MIN_DISK_SIZE", "Disk", "FlushHook", "MarkDirty", "WriteHook", "open_image"]

#: Called in the vCPU thread with the byte offset in the image and the data of every
#: completed write, before the guest sees the write's status. ``data`` aliases guest
#: RAM and is valid only during the call (it is released afterwards): copy what you
#: keep.
WriteHook = Callable[[int, memoryview], None]
#: Called in the vCPU thread on every flush (after the image's fdatasync), before the
#: guest sees the flush's status.
FlushHook = Callable[[], None]
#: ``mark_dirty(addr, length)``: guest RAM the VMM wrote (added to the dirty set).
MarkDirty = Callable[[int, int], None]

MIN_DISK_SIZE = 4096
SECTOR = abi.DISK_SECTOR_SIZE
_STATUS = struct.Struct("<I")
_COUNTERS = ("reads", "read_bytes", "writes", "written_bytes", "flushes", "errors")


def open_image(path: str, size: int = 0, *, create: bool = True) -> tuple[int, int]:
    """Open the raw image at ``path`` read-write and locked: ``(fd, size in bytes)``.

    A missing image is created (sparse, zero-filled) when ``create`` and ``size`` are
    given; an existing one keeps its size, which must then equal ``size`` if given.
    The image is locked (``flock``) so that no two micro-VMs use it at once.
    """
    created = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise DomainError(f"disk image {path} does not exist (a restored micro-VM "
                              f"needs its disk image)") from None
        if not size:
            raise DomainError(f"disk image {path} does not exist; give disk_size=SIZE "
                              f"to create it") from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DomainError(f"cannot create disk image {path}: {exc.strerror}") from None
        created = True
    except OSError as exc:
        raise DomainError(f"cannot open disk image {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DomainError(f"disk image {path} is in use by another micro-VM") from None
        if created:
            os.ftruncate(fd, size)
        actual = os.lseek(fd, 0, os.SEEK_END)  # a block device too
        if size and actual != size:
            raise DomainError(f"disk image {path} is {actual} bytes, not disk_size={size}; "
                              f"leave disk_size out to use the image's size")
        if actual % SECTOR or actual < MIN_DISK_SIZE:
            raise DomainError(f"disk image {path} is {actual} bytes: a disk is a multiple "
                              f"of {SECTOR} bytes, at least {MIN_DISK_SIZE}")
    except BaseException as exc:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(exc, OSError):
            raise DomainError(f"disk image {path}: {exc.strerror}") from None
        raise
    return fd, actual


@final
class Disk:
    """Ports ``PORT_DISK`` (doorbell) / ``PORT_DISK_GEN`` over a raw image file."""

    name = "disk"
    ports: tuple[int, ...] = (abi.PORT_DISK, abi.PORT_DISK_GEN)

    def __init__(self, fd: int, path: str, size: int, ram: memoryview,
                 mark_dirty: MarkDirty) -> None:
        self.fd = fd
        self.path = path
        #: Bytes and sectors of the image.
        self.size = size
        self.sectors = size // SECTOR
        self._ram = ram
        self._mark_dirty = mark_dirty
        #: Bumped by every ``restore``; the guest reads it from ``PORT_DISK_GEN``.
        self.generation = 0
        #: See ``WriteHook`` / ``FlushHook``.
        self.write_hook: WriteHook | None = None
        self.flush_hook: FlushHook | None = None
        #: Requests and bytes read / written, flushes, failed requests (any status ≠ 0).
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: The last host-side failure (OSError or a hook's exception), if any.
        self.last_error: BaseException | None = None

    @classmethod
    def open(cls, path: str, ram: memoryview, mark_dirty: MarkDirty, *, size: int = 0,
             create: bool = True) -> Disk:
        """The device over the image at ``path`` (see ``open_image``)."""
        fd, actual = open_image(path, size, create=create)
        return cls(fd, path, actual, ram, mark_dirty)

    # -- port I/O (vCPU thread) -----------------------------------------------------
    def io_out(self, port: int, value: int) -> None:
        if port != abi.PORT_DISK:
            raise DomainError(f"disk: port {port:#x} is read-only")
        self.doorbell(value)

    def io_in(self, port: int) -> int:
        return self.generation & 0xFFFFFFFF if port == abi.PORT_DISK_GEN else 0

    def doorbell(self, addr: int) -> int:
        """Perform the request whose descriptor is at guest-physical ``addr``; write
        its status into the descriptor and return it."""
        if addr + abi.DISK_REQ.size > len(self._ram):
            raise DomainError(f"disk: request descriptor at {addr:#x} is outside guest RAM")
        op, count, sector, buf, _, _ = abi.DISK_REQ.unpack_from(self._ram, addr)
        status = self.request(op, sector, count, buf)
        at = addr + abi.DISK_REQ_STATUS_OFFSET
        _STATUS.pack_into(self._ram, at, status)
        self._mark_dirty(at, _STATUS.size)
        return status

    def request(self, op: int, sector: int, count: int, buf: int) -> int:
        """Perform one request against guest RAM; its status (``abi.DISK_*``)."""
        status = self._request(op, sector, count, buf)
        if status != abi.DISK_OK:
            self.counters["errors"] += 1
        return status

    def _request(self, op: int, sector: int, count: int, buf: int) -> int:
        if op == abi.DISK_OP_FLUSH:
            return self._flush()
        if op not in (abi.DISK_OP_READ, abi.DISK_OP_WRITE):
            return abi.DISK_E_OP
        if not 0 < count <= abi.DISK_MAX_SECTORS or sector + count > self.sectors:
            return abi.DISK_E_RANGE
        length = count * SECTOR
        if buf + length > len(self._ram):
            return abi.DISK_E_BUF
        offset = sector * SECTOR
        view = self._ram[buf : buf + length]
        try:
            if op == abi.DISK_OP_READ:
                return self._read(view, buf, offset)
            return self._write(view, offset)
        finally:
            with contextlib.suppress(BufferError):
                view.release()

    def _read(self, view: memoryview, addr: int, offset: int) -> int:
        self._mark_dirty(addr, len(view))  # whatever lands there, also on a failed read
        try:
            done = 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short read at byte {offset + done} of the image")
                done += n
        except OSError as exc:
            self.last_error = exc
            return abi.DISK_E_IO
        self.counters["reads"] += 1
        self.counters["read_bytes"] += len(view)
        return abi.DISK_OK

    def _write(self, view: memoryview, offset: int) -> int:
        try:
            done = 0
            while done < len(view):
                n = os.pwrite(self.fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write at byte {offset + done} of the image")
                done += n
            hook = self.write_hook
            if hook is not None:
                data = view.toreadonly()
                try:
                    hook(offset, data)
                finally:
                    with contextlib.suppress(BufferError):
                        data.release()
        except Exception as exc:  # an OSError, or whatever a replication hook raised
            self.last_error = exc
            return abi.DISK_E_IO
        self.counters["writes"] += 1
        self.counters["written_bytes"] += len(view)
        return abi.DISK_OK

    def _flush(self) -> int:
        try:
            os.fdatasync(self.fd)
            hook = self.flush_hook
            if hook is not None:
                hook()
        except Exception as exc:
            self.last_error = exc
            return abi.DISK_E_IO
        self.counters["flushes"] += 1
        return abi.DISK_OK

    def close(self) -> None:
        """Close the image (and release its lock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- persist --------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        return {"size": self.size, "generation": self.generation,
                "counters": dict(self.counters)}

    def restore(self, state: dict[str, Any]) -> None:
        saved = int(state["size"])
        if saved != self.size:
            raise DomainError(f"disk image {self.path} is {self.size} bytes; the checkpoint's "
                              f"disk has {saved}")
        self.generation = int(state["generation"]) + 1
        counters = state["counters"]
        self.counters = {k: int(counters.get(k, 0)) for k in _COUNTERS}
